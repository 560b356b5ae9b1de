"""Detect and refuse every network attempt of a worker process, except to the loopback.

Installed first thing in a worker (before any peer is imported), as a
``sys.addaudithook`` hook on ``socket.getaddrinfo``, ``socket.gethostbyname``,
``socket.connect`` and ``socket.sendto``: an attempt to resolve or reach any
host but the loopback raises ``OSError`` at once (so a peer that phones home
fails fast instead of hanging on this machine without internet), and is
recorded with the first place in the code that made it, so the report can
show that a peer tried, and where. The machine has no internet in any case;
the point is to see the attempt, and to keep it from costing time.

Sockets opened by C code that bypasses Python's ``socket`` module (a gRPC core,
for one) are not seen here; no peer is configured with such an exporter.
"""

from __future__ import annotations

import sys
import threading
import traceback
from typing import Any

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", ""}

_lock = threading.Lock()
attempts: list[dict[str, str]] = []  # {"event", "target", "where"}, the first 50
count = 0


def _is_loopback(host: Any) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host).strip("[]").lower()
    return host in LOOPBACK_NAMES or host.startswith("127.") or host == "::1" or host == "0.0.0.0"


def _where() -> str:
    """The outermost frame in an installed package (the peer's call) and the innermost one."""
    frames = [f for f in traceback.extract_stack()[:-3] if not f.filename.endswith(("netguard.py",))]
    installed = [f for f in frames if "site-packages" in f.filename]
    inner = next((f for f in reversed(frames) if not f.filename.endswith(("socket.py", "ssl.py"))), None)
    parts = []
    for frame in (installed[0] if installed else None, inner):
        if frame is not None:
            path = frame.filename.split("site-packages/")[-1]
            text = f"{path}:{frame.lineno} ({frame.name})"
            if text not in parts:
                parts.append(text)
    return " -> ".join(parts) or "unknown"


def _target(event: str, args: tuple[Any, ...]) -> Any:
    if event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex"):
        return args[0] if args else None
    if event in ("socket.connect", "socket.sendto"):
        address = args[1] if len(args) > 1 else None
        if isinstance(address, tuple) and address:
            return address[0]
        return None  # a Unix socket path: local
    return None


def _hook(event: str, args: tuple[Any, ...]) -> None:
    global count
    if not event.startswith("socket."):
        return
    if event not in (
        "socket.getaddrinfo",
        "socket.gethostbyname",
        "socket.gethostbyname_ex",
        "socket.connect",
        "socket.sendto",
    ):
        return
    host = _target(event, args)
    if _is_loopback(host):
        return
    with _lock:
        count += 1
        if len(attempts) < 50:
            attempts.append({"event": event, "target": str(host), "where": _where()})
    raise OSError(f"network access refused by the benchmark's netguard: {event} {host!r}")


_installed = False


def install() -> None:
    """Install the hook once for the life of the process (audit hooks cannot be removed)."""
    global _installed
    if not _installed:
        sys.addaudithook(_hook)
        _installed = True


def summary() -> dict[str, Any]:
    with _lock:
        return {"count": count, "attempts": list(attempts)}
