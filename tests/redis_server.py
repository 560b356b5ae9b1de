"""A real redis-server for the tests: started on a free 127.0.0.1 port, stopped afterwards.

Load this module as a plugin (``pytest_plugins = ["redis_server"]`` in a test
module or the root conftest) for two fixtures: ``redis_server``, one server for
the whole session, and ``fresh_redis_server``, a server of the test's own that
it may freeze, stop, or stop and start again (``down``, ``up``). The binary comes from
Debian's ``redis-server`` package (``scripts/services.sh``: ensure_redis_server);
when it is missing the fixture fails, never skips, so CI cannot pass without it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from child_processes import die_with_parent, free_port, stop_process

INSTALL_HINT = (
    "the Redis ledger tests need a real server, and no redis-server binary was found "
    "(on PATH, or at $MULTIRUN_REDIS_SERVER). Install it with "
    "`apt-get update && apt-get install -y redis-server` (scripts/services.sh: ensure_redis_server), "
    "or set MULTIRUN_REDIS_SERVER to the binary's path."
)


def redis_server_binary() -> str:
    """The redis-server binary to run; fails the test with how to install it when there is none."""
    binary = os.environ.get("MULTIRUN_REDIS_SERVER") or shutil.which("redis-server")
    if not binary or not os.access(binary, os.X_OK):
        pytest.fail(INSTALL_HINT, pytrace=False)
    return binary


def ping(port: int, timeout: float = 0.5) -> bool:
    """True if a Redis server answers PING on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process without persistence, on 127.0.0.1."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, workdir: Path) -> None:
        self.process = process
        self.port = port
        self.workdir = workdir

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def socket_path(self) -> Path:
        """The server's unix socket (it listens on both)."""
        return self.workdir / "redis.sock"

    @classmethod
    def start(cls, timeout: float = 10.0) -> RedisServer:
        """Start a server on a free port and wait until it answers PING."""
        last_error = ""
        for _ in range(3):  # the free port may be taken between choosing it and binding it
            port, workdir = free_port(), Path(tempfile.mkdtemp(prefix="multirun-redis-"))
            server = cls(_spawn(port, workdir), port, workdir)
            if server._answers(timeout):
                return server
            last_error = server._log()
            server.stop()
        pytest.fail(f"redis-server did not start and answer PING:\n{last_error}", pytrace=False)

    def down(self) -> None:
        """Stop the server, keeping its port and folder for ``up``: connections are refused."""
        if self.process.poll() is None:
            self.thaw()  # a stopped process would not act on SIGTERM
        stop_process(self.process, grace=5)

    def up(self, timeout: float = 10.0) -> None:
        """Start a server again on the port of one that is ``down``: it has lost every key."""
        self.process = _spawn(self.port, self.workdir)
        if not self._answers(timeout):
            pytest.fail(f"redis-server did not start again and answer PING:\n{self._log()}", pytrace=False)

    def _answers(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            if ping(self.port):
                return True
            time.sleep(0.02)
        return False

    def _log(self) -> str:
        return (self.workdir / "redis.log").read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove its folder."""
        self.down()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def freeze(self) -> None:
        """Stop the process answering (SIGSTOP): clients see time-outs, not refused connections."""
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)


def _spawn(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    """A redis-server without persistence on 127.0.0.1:port, logging to workdir/redis.log."""
    with (workdir / "redis.log").open("ab") as out:
        return subprocess.Popen(
            [
                redis_server_binary(),
                "--save",
                "",
                "--appendonly",
                "no",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--unixsocket",
                str(workdir / "redis.sock"),
                "--unixsocketperm",
                "700",
                "--dir",
                str(workdir),
                "--daemonize",
                "no",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server shared by the session's tests; stopped at the end even when tests fail."""
    server = RedisServer.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_redis_server() -> Iterator[RedisServer]:
    """A redis-server of the test's own, which the test may freeze or stop."""
    server = RedisServer.start()
    try:
        yield server
    finally:
        server.stop()
