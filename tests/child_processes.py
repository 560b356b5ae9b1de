"""What the test servers (Redis, SeaweedFS, the tracing stack) and the child programs of the
tests share about their processes."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys


def environment_without_settings() -> dict[str, str]:
    """This process's environment without the OTEL_* and MULTIRUN_* variables: a child program
    configured only by what its test gives it."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "MULTIRUN_"))}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """``preexec_fn``: have Linux send SIGTERM to the server if the test process dies first."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop_process(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``grace`` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
