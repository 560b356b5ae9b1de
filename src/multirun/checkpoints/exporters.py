"""Blob exporters: where checkpoint bytes go.

A blob exporter is as small as OpenTelemetry's SpanExporter: ``put`` bytes
under a key and get back a URI, ``get`` by URI (or key), ``list`` keys under a
prefix, ``delete``. Puts are write-once and atomic: a reader never sees part
of a blob, and a second put to the same key raises BlobExistsError.

Exporters are chosen by URI scheme, the way OpenTelemetry picks exporters by
name: ``memory://name``, ``file:///path`` (or a plain path), ``s3://bucket/prefix``
(see ``multirun.checkpoints.s3``), or any scheme a third-party package registers
as an entry point in the ``multirun.blob_exporters`` group::

    from multirun.checkpoints.exporters import exporter_from_uri, exporter_from_name

    exporter = exporter_from_uri("file:///var/lib/multirun/blobs")
    uri = exporter.put("checkpoints/run-1/c1.ckpt", b"...")   # 'file:///var/lib/.../c1.ckpt'
    assert exporter.get(uri) == b"..."
    exporter = exporter_from_name("memory", name="tests")

An exporter may also offer ``size(uri) -> int``, the blob's length read without
fetching it (the built-ins do): a checkpoint over the reader's limit is then
refused before a byte of it is read; and ``read_start(uri, size) -> bytes``, the
blob's first ``size`` bytes (fewer if it is shorter), which ``multirun checkpoints``
reads a checkpoint's name from without fetching the whole blob (the built-ins do;
without it, a checkpoint no span names is listed without a name). It may offer ``put_pending(key, blob)``
too, which ``put``s an ``envelope.PendingBlob`` (``FileBlobExporter`` does):
the body is written while the checkpoint store computes the header's digest.

A third-party exporter is a factory ``factory(uri: str | None = None, **options)``
returning a BlobExporter, registered under its URI scheme in the package's
``pyproject.toml``::

    [project.entry-points."multirun.blob_exporters"]
    gcs = "my_package.blobs:gcs_exporter"

``exporter_from_uri("gcs://bucket/x")`` then calls ``gcs_exporter("gcs://bucket/x")``
and ``exporter_from_name("gcs", bucket="b")`` calls ``gcs_exporter(bucket="b")``.
The built-ins are registered the same way by multirun-otel itself; another
distribution registering a built-in's name replaces it.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import os
import re
import tempfile
import threading
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import unquote, urlparse

from multirun._process import absolute_folder
from multirun.errors import CheckpointError, ConfigurationError

if TYPE_CHECKING:
    from multirun.checkpoints.envelope import PendingBlob

ENTRY_POINT_GROUP = "multirun.blob_exporters"
_DISTRIBUTION = "multirun-otel"


class BlobExistsError(CheckpointError):
    """Another writer already put a blob under this key: one wins, the other gets this."""


class BlobNotFoundError(CheckpointError):
    """No blob at that URI or key."""


class BlobStoreUnavailableError(CheckpointError):
    """The store could not be reached or did not answer in time (after bounded retries)."""


class BlobAccessDeniedError(CheckpointError):
    """The store refused the credentials, or they lack the permission for the operation."""


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


BlobExporterFactory = Callable[..., BlobExporter]
"""``factory(uri: str | None = None, **options) -> BlobExporter``: what an entry point names."""

# \Z, not $: "$" also matches before a final newline, which would let "key\n" through
_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)*\Z")
_PREFIX = re.compile(r"[A-Za-z0-9_.\-/]*\Z")
MAX_KEY_LENGTH = 512


def validate_key(key: str) -> str:
    """Refuse keys that could leave the store: ``..``, absolute paths, NUL, control characters."""
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        shown = key if not isinstance(key, str) or len(key) <= 80 else key[:80] + "..."
        raise CheckpointError(f"invalid blob key {shown!r}: must be 1 to {MAX_KEY_LENGTH} characters")
    if not _KEY.match(key) or any(part in (".", "..") for part in key.split("/")):
        raise CheckpointError(
            f"invalid blob key {key!r}: use letters, digits, '_', '-', '.' and '/' separators, "
            "no '..' and no leading '/'"
        )
    return key


def validate_prefix(prefix: str) -> str:
    """Refuse list prefixes no valid key could start with: ``..``, a leading ``/``, NUL."""
    if (
        not isinstance(prefix, str)
        or len(prefix) > MAX_KEY_LENGTH
        or not _PREFIX.match(prefix)
        or prefix.startswith("/")
        or "//" in prefix
        or any(part in (".", "..") for part in prefix.split("/")[:-1])
    ):
        raise CheckpointError(f"invalid blob key prefix {prefix!r}")
    return prefix


class MemoryBlobExporter:
    """Keeps blobs in a dict: for tests and short-lived processes."""

    def __init__(self, name: str = "default") -> None:
        self.name = name
        self._blobs: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def _key(self, uri: str) -> str:
        prefix = f"memory://{self.name}/"
        return validate_key(uri[len(prefix) :] if uri.startswith(prefix) else uri)

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

    def size(self, uri: str) -> int:
        return len(self.get(uri))

    def read_start(self, uri: str, size: int) -> bytes:
        return self.get(uri)[:size]

    def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        with self._lock:
            return sorted(k for k in self._blobs if k.startswith(prefix))

    def delete(self, key: str) -> None:
        key = self._key(key)
        with self._lock:
            self._blobs.pop(key, None)


class FileBlobExporter:
    """Keeps blobs as files under a folder: temp file, fsync, then an atomic no-replace link."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = absolute_folder(directory, "checkpoint blobs")

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
        return self._write_once(key, lambda fd: _write_at(fd, data, 0))

    def put_pending(self, key: str, blob: PendingBlob) -> str:
        """``put`` of a blob whose header is still being computed: its body is written
        meanwhile, then its header (``blob.head()`` waits for it), and only then is the
        file made durable and given its name."""

        def fill(fd: int) -> None:
            offset = blob.head_size
            for part in blob.body:
                _write_at(fd, part, offset)
                offset += len(part)
            os.fsync(fd)  # the digest is still being computed: the disk is not waited for twice
            _write_at(fd, blob.head(), 0)

        return self._write_once(key, fill)

    def _write_once(self, key: str, fill: Callable[[int], None]) -> str:
        """A temp file written by ``fill(fd)`` and fsynced, then linked under ``key`` (write-once)."""
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
        except OSError as exc:
            raise CheckpointError(f"cannot write blob {key!r} under {self.directory}: {exc}") from exc
        try:
            try:
                fill(fd)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                # link() fails if the target exists: write-once even between processes
                os.link(tmp, path)
            except FileExistsError:
                raise BlobExistsError(f"a blob already exists under {key!r}") from None
        except OSError as exc:
            raise CheckpointError(f"cannot write blob {key!r} under {self.directory}: {exc}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile (a prune): link() said so
                os.unlink(tmp)
        _fsync_dir(path.parent)
        return path.as_uri()

    def get(self, uri: str) -> bytes:
        path = self._path(self._key(uri))
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise BlobNotFoundError(f"no blob at {uri}") from None
        except OSError as exc:
            raise CheckpointError(f"cannot read blob {uri}: {exc}") from exc

    def read_start(self, uri: str, size: int) -> bytes:
        """The blob's first ``size`` bytes (fewer if it is shorter)."""
        path = self._path(self._key(uri))
        try:
            with path.open("rb") as file:
                return file.read(size)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise BlobNotFoundError(f"no blob at {uri}") from None
        except OSError as exc:
            raise CheckpointError(f"cannot read blob {uri}: {exc}") from exc

    def size(self, uri: str) -> int:
        """The blob's length in bytes, from the file system (nothing is read)."""
        path = self._path(self._key(uri))
        try:
            return path.stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            raise BlobNotFoundError(f"no blob at {uri}") from None
        except OSError as exc:
            raise CheckpointError(f"cannot read blob {uri}: {exc}") from exc

    def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)

        def refuse(error: OSError) -> None:  # os.walk skips a folder it cannot read, silently
            if not isinstance(error, (FileNotFoundError, NotADirectoryError)):  # gone meanwhile: fine
                raise error

        keys = []
        try:
            if not self.directory.is_dir():
                if self.directory.exists():  # a file where the folder should be
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(self.directory))
                return []
            for root, _dirs, files in os.walk(self.directory, onerror=refuse):
                for name in files:
                    if name.startswith(".tmp-"):
                        continue
                    key = Path(root, name).relative_to(self.directory).as_posix()
                    if key.startswith(prefix):
                        keys.append(key)
        except OSError as exc:
            where = exc.filename or self.directory
            hint = (
                "it is a file: move it, or give the store another folder"
                if isinstance(exc, NotADirectoryError)
                else "check that it is readable (and searchable) by this user"
            )
            raise CheckpointError(
                f"cannot list the blob store's folder {where}: {exc.strerror or exc}; {hint}"
            ) from None
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(self._key(key))
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError as exc:  # a read-only folder: a CheckpointError, as a failed put or get is
            raise CheckpointError(f"cannot remove blob {path}: {exc.strerror or exc}") from exc


def _write_at(fd: int, data: bytes, offset: int) -> None:
    """All of ``data`` at ``offset`` in the file ``fd`` (a short write is written on)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


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


def memory_exporter(uri: str | None = None, *, name: str | None = None) -> MemoryBlobExporter:
    """Factory of ``memory://name``: a new, empty in-memory store."""
    return MemoryBlobExporter(name or (urlparse(uri).netloc if uri else "") or "default")


def file_exporter(
    uri: str | None = None, *, directory: str | os.PathLike[str] | None = None
) -> FileBlobExporter:
    """Factory of ``file:///path`` (or a plain path, or ``directory=``): blobs as files."""
    if directory is None and uri:
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            directory = uri
        elif parsed.netloc not in ("", "localhost"):
            raise ConfigurationError(
                f"file URI {uri!r}: its path must be absolute, "
                f"file:///{parsed.netloc}{parsed.path} (three slashes)"
            )
        else:
            directory = unquote(parsed.path)
            if not directory:  # the URI's own fix, not a factory argument (a command has none)
                raise ConfigurationError(f"file URI {uri!r} has no path: file:///path")
    if not directory:
        raise ConfigurationError("the file blob exporter needs a directory: file:///path or directory=")
    if "\0" in os.fspath(directory):  # "%00": no file name holds one, and os.stat raises a bare ValueError
        raise ConfigurationError(f"blob store {uri or os.fspath(directory)!r}: its path has a NUL character")
    if os.path.exists(directory) and not os.path.isdir(directory):  # every put would fail
        raise ConfigurationError(
            f"a file blob store must be a folder, got {os.fspath(directory)!r} (a file of that name exists)"
        )
    return FileBlobExporter(directory)


def _s3_exporter(uri: str | None = None, **options: Any) -> BlobExporter:
    from multirun.checkpoints.s3 import s3_exporter  # imports boto3 only when used

    return s3_exporter(uri, **options)


BUILTIN_EXPORTERS: dict[str, BlobExporterFactory] = {
    "memory": memory_exporter,
    "file": file_exporter,
    "s3": _s3_exporter,
}
"""The fallback when multirun-otel's own entry points are not installed (running from a source tree)."""


def _entry_points(name: str | None = None) -> list[EntryPoint]:
    found = entry_points(group=ENTRY_POINT_GROUP)
    chosen = [ep for ep in found if name is None or ep.name == name]
    # another distribution's registration comes first, so it can replace a built-in on purpose
    return sorted(chosen, key=lambda ep: ep.dist is not None and ep.dist.name == _DISTRIBUTION)


def available_exporters() -> list[str]:
    """The names (URI schemes) of every blob exporter: built-in and registered."""
    return sorted({*BUILTIN_EXPORTERS, *(ep.name for ep in _entry_points())})


def exporter_factory(name: str, *, what: str = "blob exporter named") -> BlobExporterFactory:
    """The factory registered under ``name`` in ``multirun.blob_exporters``, else the built-in one."""
    for ep in _entry_points(name):
        try:
            factory = ep.load()
        except Exception as exc:
            raise ConfigurationError(
                f"blob exporter {name!r}: entry point {ep.value!r} failed to load: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if not callable(factory):
            raise ConfigurationError(f"blob exporter {name!r}: entry point {ep.value!r} is not callable")
        return factory  # type: ignore[no-any-return]
    if name in BUILTIN_EXPORTERS:
        return BUILTIN_EXPORTERS[name]
    raise ConfigurationError(
        f"no {what} {name!r}; available: {', '.join(available_exporters())}. "
        f"A third-party exporter registers an entry point in the {ENTRY_POINT_GROUP!r} group."
    )


def _create(name: str, factory: BlobExporterFactory, /, *args: Any, **options: Any) -> BlobExporter:
    try:
        inspect.signature(factory).bind(*args, **options)
    except TypeError as exc:
        raise ConfigurationError(f"blob exporter {name!r} does not take these options: {exc}") from None
    except ValueError:  # no signature to check (a builtin): let the call decide
        pass
    exporter = factory(*args, **options)
    if not isinstance(exporter, BlobExporter):
        raise ConfigurationError(
            f"blob exporter {name!r} returned {type(exporter).__name__}, which has no put/get/list/delete"
        )
    return exporter


def exporter_from_uri(uri: str, **options: Any) -> BlobExporter:
    """The blob exporter for ``uri``, found by its scheme: ``memory://``, ``file://``, ``s3://``, a path...

    ``options`` go to the exporter's factory along with the URI. A ConfigurationError says what
    is wrong with the URI, not where it was set: the caller names that (``checkpoint_uri``,
    ``MULTIRUN_CHECKPOINT_URI``, ``--store``).
    """
    if not isinstance(uri, str) or not uri:
        raise ConfigurationError(f"a blob store URI must be a non-empty string, got {uri!r}")
    scheme = urlparse(uri).scheme.lower()
    if scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        return file_exporter(uri, **options)
    factory = exporter_factory(scheme, what="blob exporter for the URI scheme")
    return _create(scheme, factory, uri, **options)


def exporter_from_name(name: str, /, **options: Any) -> BlobExporter:
    """The blob exporter registered as ``name``, made from keyword ``options`` (``uri=`` among them)."""
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"blob exporter name must be a non-empty string, got {name!r}")
    return _create(name, exporter_factory(name), **options)
