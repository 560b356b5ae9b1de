"""One conformance suite for every blob exporter: memory, file, and S3 against a real SeaweedFS.

Each case runs against each exporter, made from its URI the way users make it
(``exporter_from_uri``; S3 takes its endpoint, region and credentials from the
standard AWS variables). Then what only S3 has (credentials, unreachable
endpoints, the fallback without conditional writes) and the entry-point
registry, tested with a real distribution put on sys.path.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from local_http import LocalHTTPServer, QuietHandler
from multirun.checkpoints import exporters
from multirun.checkpoints.envelope import PendingBlob, open_blob, seal
from multirun.checkpoints.exporters import (
    BUILTIN_EXPORTERS,
    ENTRY_POINT_GROUP,
    BlobAccessDeniedError,
    BlobExistsError,
    BlobExporter,
    BlobNotFoundError,
    BlobStoreUnavailableError,
    FileBlobExporter,
    MemoryBlobExporter,
    available_exporters,
    exporter_from_name,
    exporter_from_uri,
)
from multirun.checkpoints.s3 import S3BlobExporter
from multirun.errors import CheckpointError, ConfigurationError

if TYPE_CHECKING:
    from s3_server import S3Server

pytest_plugins = ["s3_server"]

KINDS = ["memory", "file", "s3"]
PAYLOADS = {
    "empty": b"",
    "one-byte": b"\x00",
    "5MB": os.urandom(5 * 1024 * 1024),
    "all-bytes": bytes(range(256)),
}
BAD_KEYS = ["../x", "/abs", "a//b", "a\x00b", "x" * 600, "a/../b", "", "a/./b", "a\nb"]


@pytest.fixture(autouse=True)
def isolated_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No AWS variable, profile or instance metadata of the machine leaks into a test."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@dataclass
class Subject:
    """An exporter under test and the URI that opens the same store again (in another process too)."""

    kind: str
    uri: str
    exporter: BlobExporter
    env: dict[str, str]
    directory: Path | None = None


def make_subject(kind: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: Any) -> Subject:
    env: dict[str, str] = {}
    directory = None
    if kind == "memory":
        uri = "memory://conformance"
    elif kind == "file":
        directory = tmp_path / "blobs"
        uri = directory.as_uri()
    else:
        server: S3Server = request.getfixturevalue("s3_server")
        env = server.env()
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        uri = f"s3://{server.BUCKET}/t-{uuid.uuid4().hex[:12]}"  # a prefix of the test's own
    return Subject(kind, uri, exporter_from_uri(uri), env, directory)


@pytest.fixture(params=KINDS)
def subject(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Subject:
    return make_subject(request.param, request, tmp_path, monkeypatch)


@pytest.fixture(params=["file", "s3"])
def shared_subject(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Subject:
    """The exporters whose store other processes can open."""
    return make_subject(request.param, request, tmp_path, monkeypatch)


# the conformance suite


@pytest.mark.parametrize("payload", PAYLOADS.values(), ids=PAYLOADS.keys())
def test_put_then_get_returns_the_same_bytes(subject: Subject, payload: bytes) -> None:
    subject.exporter.put("runs/r1/blob.ckpt", payload)
    assert subject.exporter.get("runs/r1/blob.ckpt") == payload


def test_put_returns_a_uri_that_get_accepts(subject: Subject) -> None:
    uri = subject.exporter.put("runs/r1/c1.ckpt", b"checkpoint")
    assert uri.startswith(f"{subject.kind}://")
    assert uri.endswith("/runs/r1/c1.ckpt")
    assert subject.exporter.get(uri) == b"checkpoint"
    if subject.kind == "s3":
        assert uri == f"{subject.uri}/runs/r1/c1.ckpt"
    if subject.kind != "memory":  # another exporter on the same store reads it too
        assert exporter_from_uri(subject.uri).get(uri) == b"checkpoint"


def test_second_put_to_a_key_is_refused_and_the_first_content_kept(subject: Subject) -> None:
    subject.exporter.put("k", b"first")
    with pytest.raises(BlobExistsError, match="already exists"):
        subject.exporter.put("k", b"second")
    assert subject.exporter.get("k") == b"first"


def race_threads(exporter: BlobExporter, key: str, writers: int) -> list[str]:
    """``writers`` threads put to ``key`` at once; what each got: "won", "lost" or an error."""
    barrier = threading.Barrier(writers)
    results = [""] * writers

    def write(i: int) -> None:
        barrier.wait()
        try:
            exporter.put(key, f"writer {i}".encode())
            results[i] = "won"
        except BlobExistsError:
            results[i] = "lost"
        except Exception as exc:
            results[i] = repr(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_threads_racing_on_one_key_exactly_one_wins(subject: Subject) -> None:
    for round_ in range(3):  # SeaweedFS makes the losers wait up to ~2 s: keep it to a few rounds
        results = race_threads(subject.exporter, f"race/{round_}", writers=6)
        assert sorted(results) == ["lost"] * 5 + ["won"], results
        assert subject.exporter.get(f"race/{round_}") == f"writer {results.index('won')}".encode()


RACER = textwrap.dedent(
    """
    import os, sys, time
    from multirun.checkpoints.exporters import BlobExistsError, exporter_from_uri

    uri, key, go = sys.argv[1:4]
    exporter = exporter_from_uri(uri)
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.001)
    try:
        exporter.put(key, f"writer {os.getpid()}".encode())
        print("won", os.getpid(), flush=True)
    except BlobExistsError:
        print("lost", flush=True)
    """
)


def test_processes_racing_on_one_key_exactly_one_wins(shared_subject: Subject, tmp_path: Path) -> None:
    go = tmp_path / "go"
    env = {**os.environ, **shared_subject.env}
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, shared_subject.uri, "race/processes", str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(4)
    ]
    try:
        for racer in racers:
            assert racer.stdout is not None
            assert racer.stdout.readline().strip() == "ready", racer.stderr.read() if racer.stderr else ""
        go.touch()
        outputs = [racer.communicate(timeout=60) for racer in racers]
    finally:
        for racer in racers:
            if racer.poll() is None:
                racer.kill()
                racer.wait()
    lines = [out.strip() for out, _err in outputs]
    winners = [line for line in lines if line.startswith("won")]
    assert len(winners) == 1 and lines.count("lost") == 3, (lines, [err for _out, err in outputs])
    pid = winners[0].split()[1]
    assert shared_subject.exporter.get("race/processes") == f"writer {pid}".encode()


def test_list_by_prefix_is_sorted_and_only_matching(subject: Subject) -> None:
    keys = ["a/1", "a/10", "a/2", "a-x", "ab", "b/1", "a/deep/er"]
    for key in keys:
        subject.exporter.put(key, key.encode())
    assert subject.exporter.list("a/") == ["a/1", "a/10", "a/2", "a/deep/er"]
    assert subject.exporter.list("a") == ["a-x", "a/1", "a/10", "a/2", "a/deep/er", "ab"]
    assert subject.exporter.list("a/deep/") == ["a/deep/er"]
    assert subject.exporter.list() == sorted(keys)
    assert subject.exporter.list("zzz") == []


def test_list_goes_past_1000_keys(subject: Subject) -> None:
    keys = [f"many/{i:05d}" for i in range(1100)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: subject.exporter.put(key, b"x"), keys))
    subject.exporter.put("other", b"x")
    assert subject.exporter.list("many/") == keys  # S3 answers 1000 keys a page: two pages
    assert subject.exporter.list("many/010") == keys[1000:1100]
    if subject.kind == "s3":  # smaller pages, the client asking for each
        assert exporter_from_uri(subject.uri + "?page_size=300").list("many/") == keys


def test_delete_then_get_is_not_found(subject: Subject) -> None:
    subject.exporter.put("gone/soon", b"x")
    subject.exporter.delete("gone/soon")
    with pytest.raises(BlobNotFoundError):
        subject.exporter.get("gone/soon")
    assert subject.exporter.list("gone/") == []
    subject.exporter.put("gone/soon", b"again")  # the key is free again
    assert subject.exporter.get("gone/soon") == b"again"


def test_read_start_gives_the_first_bytes_of_a_blob(subject: Subject) -> None:
    data = bytes(range(256)) * 40
    uri = subject.exporter.put("start/of", data)
    read_start = subject.exporter.read_start  # type: ignore[attr-defined]
    assert read_start("start/of", 100) == data[:100]
    assert read_start(uri, 0) == b""
    assert read_start("start/of", len(data) + 10) == data  # fewer, for a shorter blob
    subject.exporter.put("start/empty", b"")
    assert read_start("start/empty", 10) == b""
    with pytest.raises(BlobNotFoundError):
        read_start("never/written", 10)


def test_s3_read_start_reads_only_the_start_from_a_server_that_ignores_range(fake_credentials: None) -> None:
    """A server that ignores the Range header answers with the whole object: ``read_start``
    (what ``multirun checkpoints`` names a checkpoint by) reads its first bytes and closes the
    response, instead of downloading a blob of up to a gigabyte for each checkpoint listed."""
    whole = b"MRCK1\n" + bytes(50 << 20)
    sent: list[int] = []

    class WholeObject(QuietHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)  # not 206: the Range header is ignored
            self.send_header("Content-Length", str(len(whole)))
            self.end_headers()
            try:
                for at in range(0, len(whole), 1 << 16):
                    self.wfile.write(whole[at : at + (1 << 16)])
                    sent.append(1 << 16)
            except OSError:  # the reader closed the connection
                pass

    server = LocalHTTPServer(WholeObject)
    server.start()
    try:
        exporter = S3BlobExporter("bucket", endpoint_url=server.url, addressing_style="path")
        assert exporter.read_start("checkpoints/a/b.ckpt", 4103) == whole[:4103]
        time.sleep(0.5)  # the server's writes fail once the socket buffers are full
        assert sum(sent) < len(whole) // 4, f"{sum(sent)} bytes sent for 4103 asked"
    finally:
        server.stop()


def test_get_of_a_missing_key_is_not_found(subject: Subject) -> None:
    with pytest.raises(BlobNotFoundError, match="never/written"):
        subject.exporter.get("never/written")


def test_delete_of_a_missing_key_is_a_no_op(subject: Subject) -> None:
    subject.exporter.delete("never/written")
    subject.exporter.delete("never/written")
    assert subject.exporter.list() == []


@pytest.mark.parametrize("key", BAD_KEYS, ids=lambda k: repr(k)[:20])
def test_invalid_keys_are_refused_before_any_io(subject: Subject, key: str) -> None:
    operations: list[Callable[[], object]] = [
        lambda: subject.exporter.put(key, b"x"),
        lambda: subject.exporter.get(key),
        lambda: subject.exporter.delete(key),
    ]
    for operation in operations:
        with pytest.raises(CheckpointError, match="invalid blob key") as info:
            operation()
        assert not isinstance(info.value, BlobNotFoundError)
    assert subject.exporter.list() == []
    if subject.directory is not None:  # nothing was created, not even a folder
        assert not subject.directory.exists() or not any(subject.directory.iterdir())


def test_invalid_list_prefixes_are_refused(subject: Subject) -> None:
    for prefix in ["../", "/abs", "a//", "a\x00", "../../etc/"]:
        with pytest.raises(CheckpointError, match="invalid blob key prefix"):
            subject.exporter.list(prefix)


def test_a_reader_never_sees_a_partial_blob(subject: Subject) -> None:
    data = os.urandom(16 * 1024 * 1024)
    seen: collections.Counter[str] = collections.Counter()
    written = threading.Event()
    stop = threading.Event()
    looked = [threading.Event() for _ in range(2)]  # a reader found no blob yet: it is reading

    def read(looked: threading.Event) -> None:
        while not stop.is_set():
            try:
                got = subject.exporter.get("big/blob")
            except BlobNotFoundError:
                seen["missing"] += 1
                looked.set()
                continue
            seen["full" if got == data else f"partial {len(got)} bytes"] += 1
            if written.is_set():
                return

    readers = [threading.Thread(target=read, args=(event,)) for event in looked]
    for reader in readers:
        reader.start()
    try:
        assert all(event.wait(30) for event in looked)
        subject.exporter.put("big/blob", data)
        written.set()
        for reader in readers:
            reader.join(timeout=60)
    finally:
        stop.set()
    assert set(seen) <= {"missing", "full"}, seen
    assert seen["full"] >= 1 and seen["missing"] >= 1, seen


# The file store writes a blob's body while its digest is computed (PendingBlob)

SIGNING_KEY = b"sixteen byte key, or more"


@pytest.mark.parametrize(
    ("serializer", "key", "compression", "meta"),
    [
        ("json", None, "none", None),
        ("json", SIGNING_KEY, "zlib", None),
        ("pickle", SIGNING_KEY, "none", {"state_keys": ["a", "b"]}),
    ],
)
def test_a_blob_written_while_its_digest_is_computed_is_the_sealed_blob(
    tmp_path: Path, serializer: str, key: bytes | None, compression: Any, meta: Any
) -> None:
    exporter = FileBlobExporter(tmp_path)
    payload = os.urandom(3 * 1024 * 1024)
    blob = PendingBlob(payload, serializer, key, compression=compression, meta=meta)
    with ThreadPoolExecutor(1) as pool:
        put = pool.submit(exporter.put_pending, "c/pending.ckpt", blob)
        time.sleep(0.05)  # the body is written, and the put waits for the header
        assert not put.done()
        digest = blob.finish()
        put.result(timeout=30)
    written = exporter.get("c/pending.ckpt")
    assert (written, digest) == seal(payload, serializer, key, compression=compression, meta=meta)
    header, read = open_blob(written, max_bytes=1 << 30, hmac_key=key, allowed_serializers=[serializer])
    assert read == payload and header["digest"] == digest


def test_a_pending_blob_given_up_on_leaves_no_file(tmp_path: Path) -> None:
    exporter = FileBlobExporter(tmp_path)
    blob = PendingBlob(os.urandom(1024 * 1024), "pickle", SIGNING_KEY)
    with ThreadPoolExecutor(1) as pool:
        put = pool.submit(exporter.put_pending, "c/abandoned.ckpt", blob)
        time.sleep(0.05)
        blob.abandon()  # what the checkpoint store does when computing the digest failed
        with pytest.raises(CheckpointError, match="digest was not computed"):
            put.result(timeout=30)
    assert exporter.list() == []
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []  # no temp file either


# S3: configuration, credentials, failures


@pytest.fixture
def fake_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials for exporters that never reach a real server (so requests get signed and sent)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKFAKE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret")


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """An endpoint that accepts connections and never answers: a hung store."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def closed_endpoint() -> str:
    """An endpoint where nothing listens: connections are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def use_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_s3_endpoint_and_region_from_the_uri(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    env = s3_server.env()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", env["AWS_ACCESS_KEY_ID"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", env["AWS_SECRET_ACCESS_KEY"])
    exporter = exporter_from_uri(s3_server.uri("from-query"))
    assert isinstance(exporter, S3BlobExporter)
    assert exporter.conditional_put_supported is None  # found out on the first put
    uri = exporter.put(f"k-{uuid.uuid4().hex}", b"v")
    assert exporter.get(uri) == b"v"
    assert exporter.conditional_put_supported is True  # SeaweedFS honours If-None-Match


def test_s3_credentials_as_arguments(s3_server: S3Server) -> None:
    exporter = exporter_from_name(
        "s3",
        bucket=s3_server.BUCKET,
        prefix=f"args-{uuid.uuid4().hex[:8]}",
        endpoint_url=s3_server.endpoint_url,
        region=s3_server.REGION,
        access_key_id=s3_server.access_key,
        secret_access_key=s3_server.secret_key,
    )
    exporter.put("x", b"1")
    assert exporter.list() == ["x"]
    assert s3_server.secret_key not in repr(exporter)


def test_s3_at_the_root_of_a_bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    use_env(monkeypatch, s3_server.env())
    bucket = s3_server.create_bucket(f"multirun-root-{uuid.uuid4().hex[:8]}")
    exporter = exporter_from_uri(f"s3://{bucket}")
    assert exporter.put("a/b", b"x") == f"s3://{bucket}/a/b"
    assert exporter.list() == ["a/b"]  # the conditional-write probe left nothing behind
    assert s3_server.client().list_objects_v2(Bucket=bucket)["KeyCount"] == 1


def test_s3_wrong_credentials_are_a_clear_error(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    wrong_secret = "wrong-" + uuid.uuid4().hex
    use_env(monkeypatch, {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": wrong_secret})
    exporter = exporter_from_uri(f"s3://{s3_server.BUCKET}/creds")
    operations: list[Callable[[], object]] = [
        lambda: exporter.put("runs/r1/c1.ckpt", b"x"),
        lambda: exporter.get("runs/r1/c1.ckpt"),
        lambda: exporter.delete("runs/r1/c1.ckpt"),
    ]
    for operation in operations:
        with pytest.raises(BlobAccessDeniedError) as info:
            operation()
        message = str(info.value)
        assert f"s3://{s3_server.BUCKET}/creds/runs/r1/c1.ckpt" in message
        assert "AWS_SECRET_ACCESS_KEY" in message and "SignatureDoesNotMatch" in message
        assert wrong_secret not in message and s3_server.secret_key not in message
    with pytest.raises(BlobAccessDeniedError, match=f"s3://{s3_server.BUCKET}/creds/"):
        exporter.list()


def test_s3_a_read_only_identity_cannot_write(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = f"ro-{uuid.uuid4().hex[:8]}"
    use_env(monkeypatch, s3_server.env())
    exporter_from_uri(f"s3://{s3_server.BUCKET}/{prefix}").put("there", b"x")
    use_env(monkeypatch, s3_server.env("reader"))
    reader = exporter_from_uri(f"s3://{s3_server.BUCKET}/{prefix}?conditional_put=on")
    assert reader.list() == ["there"]
    assert reader.get("there") == b"x"
    with pytest.raises(BlobAccessDeniedError, match=f"refused to write s3://{s3_server.BUCKET}/{prefix}/new"):
        reader.put("new", b"y")


def test_s3_missing_bucket_is_named(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    use_env(monkeypatch, s3_server.env())
    exporter = exporter_from_uri("s3://multirun-no-such-bucket/p")
    with pytest.raises(CheckpointError, match="bucket 'multirun-no-such-bucket' does not exist"):
        exporter.list()
    with pytest.raises(CheckpointError, match="multirun-no-such-bucket"):
        exporter.get("k")


@pytest.mark.usefixtures("fake_credentials")
def test_s3_unreachable_endpoint_fails_in_bounded_time(closed_endpoint: str) -> None:
    exporter = exporter_from_uri(f"s3://bucket/p?endpoint_url={closed_endpoint}&region=us-east-1")
    started = time.monotonic()
    with pytest.raises(BlobStoreUnavailableError) as info:
        exporter.put("runs/r1/c1.ckpt", b"x")
    assert time.monotonic() - started < 10
    assert "s3://bucket/p/runs/r1/c1.ckpt" in str(info.value)
    assert closed_endpoint in str(info.value)
    with pytest.raises(BlobStoreUnavailableError):
        exporter.get("runs/r1/c1.ckpt")


@pytest.mark.usefixtures("fake_credentials")
def test_s3_hung_endpoint_fails_after_its_timeouts(silent_endpoint: str) -> None:
    exporter = exporter_from_uri(
        f"s3://bucket/p?endpoint_url={silent_endpoint}&read_timeout=1&max_attempts=2&conditional_put=on"
    )
    started = time.monotonic()
    with pytest.raises(BlobStoreUnavailableError, match="did not answer"):
        exporter.put("k", b"x")
    assert 1.5 < time.monotonic() - started < 6  # two attempts of one second, and a short backoff


def test_s3_default_timeouts_and_attempts_are_bounded() -> None:
    exporter = exporter_from_uri("s3://bucket/p?endpoint_url=http://127.0.0.1:9&region=us-east-1")
    assert isinstance(exporter, S3BlobExporter)
    config = exporter.client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (3.0, 5.0)
    assert config.retries["total_max_attempts"] == 2  # at most about 2 x 5 s, plus backoff


@pytest.mark.usefixtures("fake_credentials")
def test_s3_invalid_keys_never_reach_the_network() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:  # a store that never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        exporter = exporter_from_uri(f"s3://bucket/p?endpoint_url={endpoint}&read_timeout=1&max_attempts=1")
        for key in BAD_KEYS:
            with pytest.raises(CheckpointError, match="invalid blob key"):
                exporter.put(key, b"x")
            with pytest.raises(CheckpointError, match="invalid blob key"):
                exporter.get(key)
        with pytest.raises(CheckpointError, match="invalid blob key prefix"):
            exporter.list("../")
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):  # no request: no connection waits to be accepted
            listener.accept()


def test_s3_without_conditional_writes_falls_back_to_head_then_put(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_env(monkeypatch, s3_server.env())
    exporter = exporter_from_uri(f"s3://{s3_server.BUCKET}/off-{uuid.uuid4().hex[:8]}?conditional_put=off")
    assert isinstance(exporter, S3BlobExporter)
    assert exporter.conditional_put_supported is False
    exporter.put("k", b"first")
    with pytest.raises(BlobExistsError):
        exporter.put("k", b"second")
    assert exporter.get("k") == b"first"


def test_s3_a_retried_put_that_had_landed_is_not_a_conflict(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # botocore retries a put whose answer was lost; the retry's 412 must not hide the success
    use_env(monkeypatch, s3_server.env())
    exporter = exporter_from_uri(f"s3://{s3_server.BUCKET}/retry-{uuid.uuid4().hex[:8]}")
    assert isinstance(exporter, S3BlobExporter)
    full = exporter._full("k")
    exporter._put_if_absent(full, b"mine", "put-1")
    exporter._put_if_absent(full, b"mine", "put-1")  # the same put again: its own object
    with pytest.raises(BlobExistsError):
        exporter._put_if_absent(full, b"other", "put-2")
    assert exporter.get("k") == b"mine"


FORKED_READERS = textwrap.dedent(
    """
    import json, os, sys
    from multirun.checkpoints.exporters import exporter_from_uri

    blobs = {"parent": b"p" * 100, "child": b"c" * 3000}
    wrong = {"parent": [], "child": []}
    for round in range(4):  # the first read both make on the shared connection may go right
        exporter = exporter_from_uri(f"{sys.argv[1]}{round}?{sys.argv[2]}")
        for key, blob in blobs.items():
            exporter.put(key, blob)  # the client's pool keeps the connection: the child inherits it
        ready, report = os.pipe(), os.pipe()
        pid = os.fork()
        me = "child" if pid == 0 else "parent"
        if pid == 0:
            os.write(ready[1], b"x")
        else:
            os.read(ready[0], 1)
        for _ in range(50):
            try:
                got = exporter.get(me)
                if got != blobs[me]:
                    wrong[me].append(f"{len(got)} bytes {got[:8]!r}")
            except Exception as exc:
                wrong[me].append(f"{type(exc).__name__}: {exc}"[:200])
        if pid == 0:
            os.write(report[1], json.dumps(wrong["child"]).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        os.close(report[1])
        wrong["child"] = json.loads(os.read(report[0], 1 << 20))
        if wrong["parent"] or wrong["child"]:
            break
    print(json.dumps(wrong))
    """
)


def test_s3_a_forked_child_and_its_parent_never_read_each_others_answers(s3_server: S3Server) -> None:
    # a child forked after the exporter's first request used the parent's pooled connection: each
    # read answers meant for the other (a get gave the other's blob, or the empty body of the
    # other's put, a put failed with a 405 meant for a get, or one waited out its read timeout)
    uri = s3_server.uri(f"fork-{uuid.uuid4().hex[:8]}/", read_timeout=1)
    done = subprocess.run(
        [
            sys.executable,
            "-W",
            "ignore::DeprecationWarning",
            "-c",
            FORKED_READERS,
            *uri.split("?"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **s3_server.env()},
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"parent": [], "child": []}, done.stderr


def test_s3_uris_of_another_store_are_not_found(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    use_env(monkeypatch, s3_server.env())
    exporter = exporter_from_uri(f"s3://{s3_server.BUCKET}/mine")
    for uri in ["s3://other-bucket/mine/k", f"s3://{s3_server.BUCKET}/theirs/k"]:
        with pytest.raises(BlobNotFoundError, match="is not in"):
            exporter.get(uri)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3://", "needs a bucket"),
        ("s3://ab/p", "invalid S3 bucket name"),
        ("s3://bucket/a//b", "invalid S3 key prefix"),
        ("s3://bucket/p?max_attempts=many", "is not a int"),
        ("s3://bucket/p?max_attempts=0", "max_attempts must be 1 to 10"),
        ("s3://bucket/p?conditional_put=maybe", "conditional_put must be auto, on or off"),
        ("s3://bucket/p?endpoint_url=ftp://host", "endpoint_url must be http"),
        ("s3://bucket/p?region=a&region=b", "given twice"),
        # accepted, then every request failed with "the S3 endpoint did not answer", unsent
        ("s3://bucket/p?read_timeout=inf", "read_timeout must be positive seconds, at most"),
        (
            "s3://bucket/p?connect_timeout=1e300",
            "connect_timeout and read_timeout must be positive seconds, at most",
        ),
    ],
)
def test_s3_bad_uris_are_configuration_errors(uri: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        exporter_from_uri(uri)


@pytest.mark.parametrize("endpoint", ["localhost:8333", "notaurl"])
def test_an_s3_endpoint_without_a_scheme_is_named_as_given(endpoint: str) -> None:
    # the message said "got 'localhost://'" and "got '://'": what is left once user info, path
    # and query are cut, which is not what was written
    with pytest.raises(ConfigurationError) as info:
        exporter_from_uri(f"s3://bucket/p?endpoint_url={endpoint}")
    assert str(info.value) == f"S3 endpoint_url must be http(s)://host[:port], got {endpoint!r}"


def test_an_s3_endpoint_with_user_info_is_refused_without_repeating_it() -> None:
    with pytest.raises(ConfigurationError, match="endpoint_url must be http") as info:
        exporter_from_uri("s3://bucket/p?endpoint_url=AKID:TOPSECRET@host")
    assert "TOPSECRET" not in str(info.value)


def test_s3_secrets_in_a_uri_are_refused_without_being_repeated() -> None:
    for uri in ["s3://bucket/p?aws_secret_access_key=TOPSECRET", "s3://AKID:TOPSECRET@bucket/p"]:
        with pytest.raises(ConfigurationError, match="AWS_SECRET_ACCESS_KEY") as info:
            exporter_from_uri(uri)
        assert "TOPSECRET" not in str(info.value)


def test_s3_without_boto3_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # what `import boto3` meets when it is not installed
    with pytest.raises(ConfigurationError, match=r"pip install 'multirun-otel\[s3\]'"):
        exporter_from_uri("s3://bucket/prefix")


# choosing exporters: URI schemes, names, entry points


def test_the_built_ins_are_registered_as_entry_points() -> None:
    ours = {
        ep.name: ep
        for ep in entry_points(group=ENTRY_POINT_GROUP)
        if ep.dist is not None and ep.dist.name == "multirun-otel"
    }
    assert set(ours) == set(BUILTIN_EXPORTERS) == {"memory", "file", "s3"}
    from multirun.checkpoints import s3

    assert ours["memory"].load() is exporters.memory_exporter
    assert ours["file"].load() is exporters.file_exporter
    assert ours["s3"].load() is s3.s3_exporter


def test_built_ins_by_uri_and_by_name(tmp_path: Path) -> None:
    assert isinstance(exporter_from_uri("memory://x"), MemoryBlobExporter)
    assert isinstance(exporter_from_uri(str(tmp_path)), FileBlobExporter)
    named = exporter_from_name("memory", name="tests")
    assert isinstance(named, MemoryBlobExporter) and named.name == "tests"
    by_dir = exporter_from_name("file", directory=tmp_path)
    assert isinstance(by_dir, FileBlobExporter) and by_dir.directory == tmp_path
    s3 = exporter_from_name("s3", bucket="bucket", endpoint_url="http://127.0.0.1:9")
    assert isinstance(s3, S3BlobExporter) and s3.bucket == "bucket"
    with pytest.raises(ConfigurationError, match="does not take these options"):
        exporter_from_name("memory", colour="red")
    with pytest.raises(ConfigurationError, match="three slashes"):
        exporter_from_uri("file://relative/dir")


def test_an_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(ConfigurationError, match="'nope'; available: file, memory, s3"):
        exporter_from_uri("nope://x")
    with pytest.raises(ConfigurationError, match="no blob exporter named 'nope'"):
        exporter_from_name("nope")


PLUGIN = textwrap.dedent(
    """
    from multirun.checkpoints.exporters import MemoryBlobExporter

    class DemoExporter(MemoryBlobExporter):
        def __init__(self, uri=None, colour="blue"):
            super().__init__("demo")
            self.uri = uri
            self.colour = colour

    def make(uri=None, *, colour="blue"):
        return DemoExporter(uri, colour)

    def not_an_exporter(uri=None):
        return object()
    """
)


def install_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registrations: dict[str, str]) -> str:
    """A real distribution on sys.path: a module and a dist-info folder with entry_points.txt."""
    module = f"mr_demo_plugin_{uuid.uuid4().hex[:8]}"
    site = tmp_path / "site"
    site.mkdir()
    (site / f"{module}.py").write_text(PLUGIN)
    info = site / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    lines = [f"{name} = {target.format(module=module)}" for name, target in registrations.items()]
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n" + "\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, module, raising=False)
    return module


def test_a_third_party_exporter_is_found_by_its_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = install_plugin(
        tmp_path,
        monkeypatch,
        {
            "demo": "{module}:make",
            "broken": "no_such_module_anywhere:make",
            "notexporter": "{module}:not_an_exporter",
        },
    )
    assert {"demo", "broken", "notexporter", "memory", "file", "s3"} <= set(available_exporters())
    exporter = exporter_from_uri("demo://shelf/one")
    assert type(exporter).__module__ == module
    assert exporter.uri == "demo://shelf/one"  # type: ignore[attr-defined]
    assert exporter.get(exporter.put("k", b"v")) == b"v"
    named = exporter_from_name("demo", uri="demo://x", colour="red")
    assert named.colour == "red"  # type: ignore[attr-defined]
    assert exporter_from_uri("demo://y", colour="green").colour == "green"  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match="does not take these options"):
        exporter_from_name("demo", size=3)
    with pytest.raises(ConfigurationError, match="'no_such_module_anywhere:make' failed to load"):
        exporter_from_uri("broken://x")
    with pytest.raises(ConfigurationError, match="returned object, which has no put/get/list/delete"):
        exporter_from_uri("notexporter://x")


def test_a_third_party_registration_replaces_a_built_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = install_plugin(tmp_path, monkeypatch, {"memory": "{module}:make"})
    assert type(exporter_from_uri("memory://x")).__module__ == module
