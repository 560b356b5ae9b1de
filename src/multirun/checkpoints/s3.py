"""S3 blob exporter: checkpoints in AWS S3 or any store that speaks S3 (SeaweedFS, MinIO, Ceph, R2...).

Chosen by a ``s3://bucket/prefix`` URI::

    import multirun

    multirun.init(checkpoint_uri="s3://my-bucket/checkpoints")  # AWS; credentials from the environment
    multirun.init(checkpoint_uri="s3://ckpt/dev?endpoint_url=http://127.0.0.1:8333&region=us-east-1")

or built directly::

    from multirun.checkpoints.s3 import S3BlobExporter

    exporter = S3BlobExporter("my-bucket", "checkpoints", region="eu-west-1")
    uri = exporter.put("run-1/c1.ckpt", blob)  # 's3://my-bucket/checkpoints/run-1/c1.ckpt'
    assert exporter.get(uri) == blob

Configuration comes from the URI's query parameters, else from the standard
AWS variables: the endpoint from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``
(none: AWS itself), the region from ``AWS_REGION`` or ``AWS_DEFAULT_REGION``,
the credentials from ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``
(``AWS_SESSION_TOKEN``), ``AWS_PROFILE`` or the rest of boto3's chain.
Credentials never go in the URI. Query parameters: ``endpoint_url``,
``region``, ``profile``, ``addressing_style`` (path, virtual, auto),
``connect_timeout`` and ``read_timeout`` (seconds), ``max_attempts``,
``conditional_put`` (auto, on, off) and ``page_size`` (keys per list request).

Write-once: a put is a conditional ``PutObject`` with ``If-None-Match: *``;
the store answers 412 PreconditionFailed when the key exists, and the put
raises BlobExistsError (unless the object carries this put's own
``x-amz-meta-multirun-put-id``: a retry of a put whose answer was lost). A PUT
is atomic in S3: readers see the whole object or none. Stores that do not
support conditional writes are detected (a 501 answer, or, with
``conditional_put=auto`` on a non-AWS endpoint, a probe on the first put that
checks the header is honoured) and then get HEAD-then-PUT, which has a race
window: two writers that both HEAD before either PUTs both succeed and the
last one wins. A warning is logged when that happens.

Bounded: each request has a connect and a read timeout (3 s and 5 s by
default) and at most ``max_attempts`` tries (2), so a dead store fails with
BlobStoreUnavailableError within about 12 s (2 x 5 s and a backoff of at most
2 s); a refused connection fails at once. Errors from botocore become
CheckpointError subclasses naming the bucket and key, never the credentials.

Fork-safe: a forked child (a multiprocessing worker) makes its own client on its
first request instead of sharing the parent's pooled connections.

Needs boto3: ``pip install 'multirun-otel[s3]'``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from multirun.checkpoints.exporters import (
    BlobAccessDeniedError,
    BlobExistsError,
    BlobNotFoundError,
    BlobStoreUnavailableError,
    validate_key,
    validate_prefix,
)
from multirun.errors import CheckpointError, ConfigurationError

__all__ = ["INSTALL_HINT", "S3BlobExporter", "parse_s3_uri", "s3_exporter"]

_logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'multirun-otel[s3]'"
DEFAULT_CONNECT_TIMEOUT = 3.0
DEFAULT_READ_TIMEOUT = 5.0
DEFAULT_MAX_ATTEMPTS = 2
MAX_TIMEOUT = 1e9  # seconds: longer overflows the socket's timeout

_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{1,253}[A-Za-z0-9]$")
_AWS_HOST = re.compile(r"(^|\.)amazonaws\.com(\.cn)?$")
_PUT_ID = "multirun-put-id"  # x-amz-meta-multirun-put-id: tells our own retried put from another writer's
_PROBE = ".multirun-probe-"  # not a valid key, so it never meets a user's blob and list() hides it
_DENIED = frozenset(
    {
        "AccessDenied",
        "AccountProblem",
        "AllAccessDisabled",
        "AuthorizationHeaderMalformed",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidSecurity",
        "InvalidToken",
        "SignatureDoesNotMatch",
        "TokenRefreshRequired",
    }
)
_NOT_FOUND = frozenset({"NoSuchKey", "NotFound", "404"})
_QUERY: dict[str, type] = {
    "endpoint_url": str,
    "region": str,
    "profile": str,
    "addressing_style": str,
    "connect_timeout": float,
    "read_timeout": float,
    "max_attempts": int,
    "conditional_put": str,
    "page_size": int,
}


class _NoConditionalWrites(Exception):
    """The store refused If-None-Match as not implemented."""


def _boto3() -> Any:
    try:
        import boto3
        import botocore.exceptions  # noqa: F401
    except ImportError as exc:
        raise ConfigurationError(
            f"s3:// checkpoint stores need boto3, which is not installed: {INSTALL_HINT}"
        ) from exc
    return boto3


def _status(exc: Any) -> tuple[str, int]:
    """The error code and HTTP status of a botocore ClientError."""
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _unsupported(code: str, status: int) -> bool:
    return status == 501 or code == "NotImplemented"


def _safe_endpoint(url: str | None) -> str:
    """The endpoint as scheme://host:port, without user info, path or query."""
    if not url:
        return "AWS S3"
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}"


class S3BlobExporter:
    """Keeps blobs as objects under ``s3://bucket/prefix/``: conditional puts, bounded requests.

    ``client`` may be a ready boto3 S3 client; otherwise one is made from the
    arguments and the standard AWS variables (see the module's docstring).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        addressing_style: str | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        conditional_put: str = "auto",
        page_size: int | None = None,
        client: Any = None,
    ) -> None:
        if not isinstance(bucket, str) or not _BUCKET.match(bucket):
            raise ConfigurationError(
                f"invalid S3 bucket name {bucket!r}: 3 to 255 letters, digits, '.', '-' or '_'"
            )
        prefix = (prefix or "").strip("/")
        if prefix:
            try:
                validate_key(prefix)
            except CheckpointError as exc:
                raise ConfigurationError(f"invalid S3 key prefix {prefix!r}: {exc}") from None
        if conditional_put not in ("auto", "on", "off"):
            raise ConfigurationError(f"conditional_put must be auto, on or off, got {conditional_put!r}")
        if addressing_style not in (None, "auto", "path", "virtual"):
            raise ConfigurationError(
                f"addressing_style must be auto, path or virtual, got {addressing_style!r}"
            )
        if not 0 < connect_timeout <= MAX_TIMEOUT or not 0 < read_timeout <= MAX_TIMEOUT:
            raise ConfigurationError(
                f"S3 connect_timeout and read_timeout must be positive seconds, at most {MAX_TIMEOUT:g}"
            )
        if not 1 <= max_attempts <= 10:
            raise ConfigurationError(f"S3 max_attempts must be 1 to 10, got {max_attempts}")
        if page_size is not None and not 1 <= page_size <= 1000:
            raise ConfigurationError(f"S3 page_size must be 1 to 1000, got {page_size}")
        self.bucket = bucket
        self.prefix = prefix
        self.page_size = page_size
        self.max_attempts = max_attempts
        self._supported: bool | None = {"on": True, "off": False}.get(conditional_put)
        self._probe_lock = threading.Lock()
        boto3 = _boto3()
        from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
        from botocore.exceptions import ConnectionError as EndpointError

        self._errors = (ClientError, BotoCoreError)
        self._client_error = ClientError
        self._unreachable = (EndpointError, HTTPClientError)  # refused, timed out, cut off
        self._remake: Callable[[], Any] | None = None  # a client of the same settings (see client)
        if client is None:
            self._remake = functools.partial(
                self._make_client,
                boto3,
                endpoint_url=endpoint_url
                or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL")
                or None,
                region=region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
                profile=profile,
                credentials=(access_key_id, secret_access_key, session_token),
                addressing_style=addressing_style,
                timeouts=(connect_timeout, read_timeout),
            )
            client = self._remake()
        self._client = client
        self._pid = os.getpid()
        endpoint = getattr(client.meta, "endpoint_url", None) or ""
        self.endpoint = _safe_endpoint(endpoint)
        if self._supported is None and _AWS_HOST.search(urlsplit(endpoint).hostname or ""):
            self._supported = True  # AWS S3 honours If-None-Match on PutObject (since August 2024)

    def _make_client(
        self,
        boto3: Any,
        *,
        endpoint_url: str | None,
        region: str | None,
        profile: str | None,
        credentials: tuple[str | None, str | None, str | None],
        addressing_style: str | None,
        timeouts: tuple[float, float],
    ) -> Any:
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError

        if endpoint_url is not None:
            parts = urlsplit(endpoint_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                # as written, unless it may hold credentials (user:secret@host)
                shown = _safe_endpoint(endpoint_url) if "@" in endpoint_url else endpoint_url
                raise ConfigurationError(f"S3 endpoint_url must be http(s)://host[:port], got {shown!r}")
        options: dict[str, Any] = {}
        if endpoint_url is not None:
            # other S3 stores: path-style URLs, and checksums only where the API requires them
            addressing_style = addressing_style or "path"
            options = {
                "request_checksum_calculation": "when_required",
                "response_checksum_validation": "when_required",
            }
        config = Config(
            connect_timeout=timeouts[0],
            read_timeout=timeouts[1],
            retries={"total_max_attempts": self.max_attempts, "mode": "standard"},
            s3={"addressing_style": addressing_style or "auto"},
            max_pool_connections=16,
            user_agent_extra="multirun-otel",
            **options,
        )
        key_id, secret, token = credentials
        try:
            session = boto3.session.Session(
                profile_name=profile,
                aws_access_key_id=key_id,
                aws_secret_access_key=secret,
                aws_session_token=token,
            )
            return session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        except BotoCoreError as exc:  # an unknown profile, a bad region...
            raise ConfigurationError(f"cannot configure the S3 client: {exc}") from None
        except ValueError as exc:
            raise ConfigurationError(f"cannot configure the S3 client: {exc}") from None

    def __repr__(self) -> str:
        return f"S3BlobExporter({self._where(self.prefix)!r}, endpoint={self.endpoint!r})"

    @property
    def client(self) -> Any:
        """The boto3 S3 client. A forked child gets one of its own: boto3 clients are not
        fork-safe, and on the pooled connections it inherits each process would read answers
        meant for the other (another blob, another request's error)."""
        self._check_fork()
        return self._client

    def _check_fork(self) -> None:
        if self._pid == os.getpid():
            return
        self._probe_lock = threading.Lock()  # a thread of the parent may have held it
        if self._remake is not None:
            self._client = self._remake()
        else:  # a client given: its pool drops the parent's connections and opens its own
            self._client.close()
        self._pid = os.getpid()

    @property
    def conditional_put_supported(self) -> bool | None:
        """Whether the store honours If-None-Match; None until the first put has found out."""
        return self._supported

    # keys and URIs

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self, full_key: str) -> str:
        return f"s3://{self.bucket}/{full_key}"

    def _key(self, uri: str) -> str:
        """The key of a URI from ``put`` (or of a plain key), checked."""
        if uri.startswith("s3://"):
            parts = urlsplit(uri)
            path = unquote(parts.path).lstrip("/")
            base = f"{self.prefix}/" if self.prefix else ""
            if parts.netloc != self.bucket or not path.startswith(base):
                raise BlobNotFoundError(f"{uri} is not in {self._where(base)}")
            return validate_key(path[len(base) :])
        return validate_key(uri)

    # the four operations

    def put(self, key: str, data: bytes) -> str:
        """Store ``data`` under ``key`` unless something is there already (BlobExistsError)."""
        full = self._full(validate_key(key))
        body = bytes(data)
        if self._conditional_writes(full):
            try:
                self._put_if_absent(full, body, uuid.uuid4().hex)
                return self._where(full)
            except _NoConditionalWrites:
                self._fall_back("it answered If-None-Match with 501 Not Implemented")
        self._put_after_head(full, body)
        return self._where(full)

    def get(self, uri: str) -> bytes:
        """The bytes of the object at ``uri`` (or key); BlobNotFoundError if there is none."""
        full = self._full(self._key(uri))
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=full)
            return bytes(response["Body"].read())
        except self._errors as exc:
            if _status(exc)[0] in _NOT_FOUND:
                raise BlobNotFoundError(f"no blob at {self._where(full)}") from None
            raise self._error(exc, "read", full) from exc

    def read_start(self, uri: str, size: int) -> bytes:
        """The first ``size`` bytes of the object at ``uri`` (or key), fewer if it is shorter."""
        full = self._full(self._key(uri))
        try:
            response = self.client.get_object(
                Bucket=self.bucket, Key=full, Range=f"bytes=0-{max(size, 1) - 1}"
            )
            body = response["Body"]
            try:  # a server that ignores Range sends the whole object: only its start is read
                return bytes(body.read(size))
            finally:
                body.close()
        except self._errors as exc:
            code = _status(exc)[0]
            if code in _NOT_FOUND:
                raise BlobNotFoundError(f"no blob at {self._where(full)}") from None
            if code == "InvalidRange":  # an empty object has no first byte
                return b""
            raise self._error(exc, "read", full) from exc

    def size(self, uri: str) -> int:
        """The length in bytes of the object at ``uri`` (or key), read without fetching it."""
        full = self._full(self._key(uri))
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=full)["ContentLength"])
        except self._errors as exc:
            if _status(exc)[0] in _NOT_FOUND:
                raise BlobNotFoundError(f"no blob at {self._where(full)}") from None
            raise self._error(exc, "read", full) from exc

    def list(self, prefix: str = "") -> list[str]:
        """The keys under ``prefix``, sorted, across as many pages as the store returns."""
        full = self._full(validate_prefix(prefix)) if self.prefix else validate_prefix(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        pagination = {"PageSize": self.page_size} if self.page_size else {}
        keys: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full, PaginationConfig=pagination
            )
            for page in pages:
                for item in page.get("Contents", ()):
                    key = str(item["Key"])[strip:]
                    with contextlib.suppress(CheckpointError):  # objects put there by other tools
                        keys.append(validate_key(key))
        except self._errors as exc:
            raise self._error(exc, "list", full + ("*" if not full.endswith("/") else "")) from exc
        return sorted(keys)

    def delete(self, key: str) -> None:
        """Remove the object under ``key``; a missing one is not an error."""
        full = self._full(self._key(key))
        try:
            self.client.delete_object(Bucket=self.bucket, Key=full)
        except self._errors as exc:
            if _status(exc)[0] in _NOT_FOUND:
                return
            raise self._error(exc, "delete", full) from exc

    # write-once

    def _put_if_absent(self, full: str, body: bytes, put_id: str) -> None:
        """A conditional PutObject; a 412 is BlobExistsError unless the object is this put's own."""
        for attempt in range(3):
            try:
                self.client.put_object(
                    Bucket=self.bucket, Key=full, Body=body, IfNoneMatch="*", Metadata={_PUT_ID: put_id}
                )
                return
            except self._errors as exc:
                code, status = _status(exc)
                if status == 412 or code == "PreconditionFailed":
                    # botocore may have retried a put whose first answer was lost: is it ours?
                    if self._put_id(full) == put_id:
                        return
                    raise BlobExistsError(f"a blob already exists at {self._where(full)}") from None
                if status == 409 and code == "ConditionalRequestConflict":
                    time.sleep(0.05 * (attempt + 1))  # a concurrent conditional write is in flight
                    continue
                if _unsupported(code, status):
                    raise _NoConditionalWrites(code) from None
                raise self._error(exc, "write", full) from exc
        raise CheckpointError(f"cannot write {self._where(full)}: concurrent writes kept conflicting")

    def _put_id(self, full: str) -> str | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=full)
        except self._errors:
            return None
        return head.get("Metadata", {}).get(_PUT_ID)  # type: ignore[no-any-return]

    def _put_after_head(self, full: str, body: bytes) -> None:
        """HEAD then PUT, for stores without conditional writes: racing writers may both succeed."""
        try:
            self.client.head_object(Bucket=self.bucket, Key=full)
        except self._errors as exc:
            code, status = _status(exc)
            if code not in _NOT_FOUND and status != 404:
                raise self._error(exc, "write", full) from exc
        else:
            raise BlobExistsError(f"a blob already exists at {self._where(full)}")
        try:
            self.client.put_object(Bucket=self.bucket, Key=full, Body=body)
        except self._errors as exc:
            raise self._error(exc, "write", full) from exc

    def _conditional_writes(self, full: str) -> bool:
        """Whether to use If-None-Match: known from the setting, the endpoint, or one probe."""
        if self._supported is None:
            self._check_fork()  # before the lock, which the parent may have held
            with self._probe_lock:
                if self._supported is None:
                    supported = self._probe(full)
                    if not supported:
                        self._fall_back("it ignored If-None-Match on a probe object")
                    self._supported = supported
        return bool(self._supported)

    def _probe(self, full: str) -> bool:
        """Put one probe object twice with If-None-Match: the second must fail with 412."""
        probe = self._full(f"{_PROBE}{uuid.uuid4().hex}")
        written = False
        try:
            for _ in range(2):
                try:
                    self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"", IfNoneMatch="*")
                    written = True
                except self._errors as exc:
                    code, status = _status(exc)
                    if written and (status == 412 or code == "PreconditionFailed"):
                        return True
                    if _unsupported(code, status):
                        return False
                    raise self._error(exc, "write", full) from exc
            return False  # both puts succeeded: the header was ignored
        finally:
            if written:
                with contextlib.suppress(*self._errors):
                    self.client.delete_object(Bucket=self.bucket, Key=probe)

    def _fall_back(self, reason: str) -> None:
        self._supported = False
        _logger.warning(
            "S3 store %s does not support conditional writes (%s): puts to %s use HEAD then PUT, "
            "where two writers racing on one key can both succeed",
            self.endpoint,
            reason,
            self._where(self.prefix),
        )

    # errors

    def _error(self, exc: BaseException, action: str, full: str) -> CheckpointError:
        """A CheckpointError for a botocore error: names the bucket and key, never the credentials."""
        where = self._where(full)
        name = type(exc).__name__
        if isinstance(exc, self._client_error):
            code, status = _status(exc)
            if code in _DENIED or status in (401, 403):
                return BlobAccessDeniedError(
                    f"S3 refused to {action} {where} ({code or status}): check the credentials "
                    "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the profile) and that they may "
                    f"{action} in bucket {self.bucket!r}"
                )
            if code == "NoSuchBucket":
                return CheckpointError(
                    f"cannot {action} {where}: bucket {self.bucket!r} does not exist at {self.endpoint}"
                )
            if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "RequestTimeout"):
                return BlobStoreUnavailableError(
                    f"cannot {action} {where}: {self.endpoint} answered {code or 'an error'} "
                    f"(HTTP {status}) after {self.max_attempts} attempts"
                )
            message = str(exc.response.get("Error", {}).get("Message", ""))
            return CheckpointError(f"cannot {action} {where}: {code} (HTTP {status}) {message}".rstrip())
        if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
            return BlobAccessDeniedError(
                f"cannot {action} {where}: no usable AWS credentials ({name}); set AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            )
        if isinstance(exc, self._unreachable):
            return BlobStoreUnavailableError(
                f"cannot {action} {where}: the S3 endpoint {self.endpoint} did not answer ({name}) "
                f"after {self.max_attempts} attempts"
            )
        return CheckpointError(f"cannot {action} {where}: {name}")


def parse_s3_uri(uri: str) -> dict[str, Any]:
    """``s3://bucket/prefix?option=value`` as S3BlobExporter's arguments."""
    parts = urlsplit(uri)
    if parts.scheme.lower() != "s3":
        raise ConfigurationError(f"not an s3:// URI: scheme {parts.scheme!r}")
    if "@" in parts.netloc:
        raise ConfigurationError(
            "credentials never go in an s3:// URI; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
        )
    bucket = parts.netloc
    if not bucket:
        raise ConfigurationError("an s3:// URI needs a bucket: s3://bucket/prefix")
    settings: dict[str, Any] = {"bucket": bucket, "prefix": unquote(parts.path).strip("/")}
    for name, values in parse_qs(parts.query, keep_blank_values=True).items():
        if name not in _QUERY:
            # the value is not repeated: it might be a secret put there by mistake
            raise ConfigurationError(
                f"s3://{bucket}: unknown parameter {name!r}; known: {', '.join(_QUERY)}. "
                "Credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or a profile."
            )
        if len(values) != 1:
            raise ConfigurationError(f"s3://{bucket}: parameter {name!r} given twice")
        try:
            settings[name] = _QUERY[name](values[0])
        except ValueError:
            raise ConfigurationError(
                f"s3://{bucket}: {name}={values[0]!r} is not a {_QUERY[name].__name__}"
            ) from None
    return settings


def s3_exporter(uri: str | None = None, **options: Any) -> S3BlobExporter:
    """Factory of ``s3://bucket/prefix?...`` (the ``s3`` entry point); ``options`` override the URI's."""
    settings = parse_s3_uri(uri) if uri else {}
    settings.update(options)
    if "bucket" not in settings:
        raise ConfigurationError("the S3 blob exporter needs a bucket: s3://bucket/prefix or bucket=")
    try:
        inspect.signature(S3BlobExporter).bind(**settings)
    except TypeError as exc:
        raise ConfigurationError(f"S3 blob exporter: {exc}") from None
    return S3BlobExporter(**settings)
