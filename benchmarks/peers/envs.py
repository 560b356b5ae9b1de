"""One virtual environment per peer, created on first use and reused after.

Each environment lives under ``${MULTIRUN_CACHE_DIR:-$HOME/.cache/multirun-otel}/bench-venvs/<peer>``
and is installed from ``requirements/<peer>.txt``, a lock file (every package pinned) made by
``pip freeze`` from ``requirements/<peer>.in`` (the peer's own pin) the first time, or again with
``--relock``. multirun-otel is installed from this checkout, editable, so the current ``src/`` is
what is measured. The ``with-<peer>`` environments are for the tests of multirun-otel running beside a
peer (tests/test_peer_sdks.py): the peer's lock plus multirun-otel's dependencies, without multirun-otel
itself, which the tests import from their own checkout's ``src/`` (``PYTHONPATH``), so one environment
serves every checkout. A stamp file in the environment records what it was built from (the lock's
digest and the interpreter); when either changes, the environment is built anew.

Usage (the benchmark calls it; by hand only to prepare or inspect)::

    .venv/bin/python benchmarks/peers/envs.py [--relock] [PEER ...]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
REQUIREMENTS = HERE / "requirements"
PEERS = ("otel", "multirun", "traceloop", "langfuse", "logfire", "openlit", "agentops")
WITH_PEERS = ("with-logfire", "with-traceloop", "with-langfuse")
STAMP = ".multirun-bench-stamp"


class EnvError(RuntimeError):
    """An environment could not be built; the message ends with pip's last lines."""


@dataclass(frozen=True)
class Env:
    peer: str
    path: Path

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"


def cache_dir() -> Path:
    base = os.environ.get("MULTIRUN_CACHE_DIR") or str(Path.home() / ".cache" / "multirun-otel")
    return Path(base) / "bench-venvs"


def base_python() -> str:
    """The interpreter the environments are made from: the one behind the running venv."""
    return getattr(sys, "_base_executable", None) or sys.executable


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _interpreter_id(python: str) -> str:
    out = subprocess.run(
        [python, "-c", "import sys; print(sys.version)"], capture_output=True, text=True, check=True
    )
    return f"{python} {out.stdout.strip()}"


def _run(command: list[str], log: Path) -> None:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise EnvError(f"`{' '.join(command[-4:])}` failed with exit {code}:\n{tail}")


def _lock_header(peer: str) -> str:
    return (
        f"# Lock file of the `{peer}` benchmark environment: `pip freeze` after installing {peer}.in.\n"
        f"# Regenerate: .venv/bin/python benchmarks/peers/envs.py --relock {peer}\n"
    )


def ensure(peer: str, *, relock: bool = False, python: str | None = None, quiet: bool = False) -> Env:
    """The environment of ``peer``, built first if it is missing or out of date."""
    if peer not in PEERS + WITH_PEERS:
        raise ValueError(f"unknown peer {peer!r}; known: {', '.join(PEERS + WITH_PEERS)}")
    python = python or base_python()
    env = Env(peer, cache_dir() / peer)
    lock = REQUIREMENTS / f"{peer}.txt"
    source = REQUIREMENTS / f"{peer}.in"
    use_lock = lock.exists() and not relock
    requirements = lock if use_lock else source
    editable = str(ROOT) if peer == "multirun" else ""
    wanted = _digest(requirements.read_text(), _interpreter_id(python), editable)
    stamp = env.path / STAMP
    if use_lock and env.python.exists() and stamp.exists() and stamp.read_text().strip() == wanted:
        return env

    if not quiet:
        print(f"  building the {peer} environment in {env.path} (once) ...", file=sys.stderr, flush=True)
    shutil.rmtree(env.path, ignore_errors=True)
    env.path.parent.mkdir(parents=True, exist_ok=True)
    log = env.path.parent / f"{peer}.install.log"
    log.write_text("")
    _run([python, "-m", "venv", str(env.path)], log)
    pip = [str(env.python), "-m", "pip", "--timeout", "60"]
    _run([*pip, "install", "-r", str(requirements)], log)
    if editable:
        _run([*pip, "install", "--no-deps", "-e", editable], log)
    if not use_lock:
        frozen = subprocess.run(
            [*pip, "freeze", "--exclude-editable"], capture_output=True, text=True, check=True
        ).stdout
        lock.write_text(_lock_header(peer) + frozen)
        wanted = _digest(lock.read_text(), _interpreter_id(python), editable)
    stamp.write_text(wanted + "\n")
    return env


def versions(env: Env, names: list[str]) -> dict[str, str]:
    """Installed versions of ``names`` in ``env`` (``-`` when absent)."""
    code = (
        "import json, sys\n"
        "from importlib.metadata import version, PackageNotFoundError\n"
        "out = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n] = version(n)\n"
        "    except PackageNotFoundError: out[n] = '-'\n"
        "print(json.dumps(out))\n"
    )
    import json

    done = subprocess.run([str(env.python), "-c", code, *names], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "peers",
        nargs="*",
        default=list(PEERS),
        help=f"default: all ({', '.join(PEERS)}); the tests' are {', '.join(WITH_PEERS)}",
    )
    parser.add_argument("--relock", action="store_true", help="install from <peer>.in and rewrite the lock")
    args = parser.parse_args(argv)
    failed = 0
    for peer in args.peers:
        try:
            env = ensure(peer, relock=args.relock)
            print(f"{peer}: {env.path}")
        except EnvError as error:
            failed += 1
            print(f"{peer}: FAILED: {error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
