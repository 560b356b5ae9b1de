"""Checkpoints and replay under faults (issue 8, cases 15-23), end to end through the store.

The envelope's own refusals (every truncation, every bit flip, forged and
unsigned pickles, bombs) are tested byte by byte in test_serialization.py,
the exporters' write-once races in test_blob_exporters.py; here the same
faults go through CheckpointStore, ``multirun.resume`` and real processes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import tracemalloc
import uuid
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import multirun
from child_processes import environment_without_settings
from multirun import checkpoint, run, step
from multirun.checkpoints.envelope import MAGIC
from multirun.checkpoints.exporters import (
    BlobStoreUnavailableError,
    FileBlobExporter,
    MemoryBlobExporter,
    exporter_from_uri,
    validate_key,
    validate_prefix,
)
from multirun.checkpoints.hashing import input_hash
from multirun.checkpoints.store import CheckpointStore, new_checkpoint_id
from multirun.context import get_current_run_context
from multirun.errors import CheckpointError, ConfigurationError, ReplayError

if TYPE_CHECKING:
    from s3_server import S3Server

pytest_plugins = ["s3_server"]

HMAC_KEY = "a test key of at least sixteen bytes"


def saved_checkpoint(traced: Any, state: Any = "v1") -> tuple[str, str]:
    """(run id, checkpoint id) of a run that set ``state`` and checkpointed."""

    @run
    def job() -> tuple[str, str]:
        ctx = get_current_run_context()
        ctx.set_state("s", state)
        return ctx.run.id, ctx.checkpoint(name="c").value.id

    return job()


# ---------------------------------------------------------------------------
# 15, 16. a process killed with SIGKILL around a checkpoint

ORDER_PROGRAM = """
import os, signal, sys
import multirun
from multirun import run, step
from multirun.context import get_current_run_context

multirun.init_local(sys.argv[1])
effects = open(sys.argv[2], "a")
crash_at = os.environ.get("CRASH", "")

def side_effect(name):
    effects.write(name + "\\n")
    effects.flush()
    os.fsync(effects.fileno())

@step(checkpoint=True)
def charge_card(n: int) -> str:
    side_effect(f"charge {n}")
    if crash_at == f"in charge {n}":
        os.kill(os.getpid(), signal.SIGKILL)  # after its side effect, before its checkpoint
    return f"receipt {n}"

@step(checkpoint=True)
def ship(receipts: list) -> str:
    side_effect("ship")
    return "shipped " + ",".join(receipts)

@run(name="order")
def order() -> str:
    print("RUN", get_current_run_context().run.id, flush=True)
    first = charge_card(1)
    if crash_at == "after checkpoint 1":
        os.kill(os.getpid(), signal.SIGKILL)  # right after the checkpoint of charge_card(1)
    second = charge_card(2)
    return ship([first, second])

print("RESULT", order(), flush=True)
multirun.get_client().force_flush()
"""


def order_process(
    tmp_path: Path, crash: str = "", resume: str | None = None
) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "order.py"
    script.write_text(ORDER_PROGRAM)
    env = environment_without_settings()
    env["CRASH"] = crash
    if resume is not None:
        env["MULTIRUN_RESUME"] = resume
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path / "mr"), str(tmp_path / "effects.txt")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("crash", "effects"),
    [
        # 15: killed after charge 2's side effect, before its checkpoint: it runs again (at-least-once)
        ("in charge 2", ["charge 1", "charge 2", "charge 2", "ship"]),
        # 16: killed right after charge 1's checkpoint: nothing runs twice
        ("after checkpoint 1", ["charge 1", "charge 2", "ship"]),
    ],
    ids=["sigkill-before-checkpoint", "sigkill-right-after-checkpoint"],
)
def test_15_16_resume_after_sigkill_repeats_only_the_step_that_had_not_been_checkpointed(
    tmp_path: Path, crash: str, effects: list[str]
) -> None:
    crashed = order_process(tmp_path, crash=crash)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    run_id = crashed.stdout.split("RUN ", 1)[1].split()[0]

    resumed = order_process(tmp_path, resume=run_id)
    assert resumed.returncode == 0, resumed.stderr
    assert "RESULT shipped receipt 1,receipt 2" in resumed.stdout
    assert (tmp_path / "effects.txt").read_text().splitlines() == effects


# ---------------------------------------------------------------------------
# 17. truncated, empty, bit-flipped blobs


def damage(blob: bytes, how: str, position: int, value: int) -> bytes:
    position %= max(len(blob), 1)
    if how == "truncate":
        return blob[:position]
    if how == "empty":
        return b""
    if how == "flip":
        return blob[:position] + bytes([blob[position] ^ (1 << (value % 8))]) + blob[position + 1 :]
    if how == "replace":
        return blob[:position] + bytes([value]) + blob[position + 1 :]
    if how == "append":
        return blob + bytes([value])
    return blob[:position] + blob[position + 1 :]  # "delete"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    how=st.sampled_from(["truncate", "empty", "flip", "replace", "append", "delete"]),
    position=st.integers(min_value=0),
    value=st.integers(min_value=0, max_value=255),
)
def test_17_any_damaged_checkpoint_is_refused_and_the_intact_one_still_loads(
    traced: Any, how: str, position: int, value: int
) -> None:
    store = CheckpointStore(MemoryBlobExporter("damage"), hmac_key=HMAC_KEY)
    traced.client.checkpoints = store
    run_id, good = saved_checkpoint(traced, {"n": [1, 2, 3], "text": "état"})
    blob = store.exporter.get(store.key(run_id, good))
    damaged = damage(blob, how, position, value)
    assume(damaged != blob)
    bad = new_checkpoint_id()
    store.exporter.put(store.key(run_id, bad), damaged)  # written later: the newest of the run

    with pytest.raises(CheckpointError):
        store.load(bad)
    with pytest.raises(CheckpointError), multirun.resume(run_id=run_id):
        pass
    assert store.load(good).state == {"s": {"n": [1, 2, 3], "text": "état"}}
    with multirun.resume(checkpoint_id=good) as restored:
        assert restored.state["s"]["text"] == "état"


# ---------------------------------------------------------------------------
# 18. a malicious pickle in the store


class Boom:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


def planted_pickle(marker: Path, *, key: bytes | None = None, version: int = 3) -> bytes:
    evil = pickle.dumps({"checkpoint": Boom(str(marker))})
    digest = "sha256:" + hashlib.sha256(evil).hexdigest()
    header: dict[str, Any] = {
        "compression": "none",
        "digest": digest,
        "serializer": "pickle",
        "size": len(evil),
        "version": version,
    }
    if key is not None:
        if version >= 3:
            label = f"MRCK/v3/pickle/none/{len(evil)}/{digest}\n".encode()
        else:
            label = b"MRCK/v2/pickle/none\n" + evil
        header["hmac"] = hmac.new(key, label, hashlib.sha256).hexdigest()
    return MAGIC + json.dumps(header, separators=(",", ":"), sort_keys=True).encode() + b"\n" + evil


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("reader", ["json-default", "pickle-with-key"])
@pytest.mark.parametrize(
    "signed_with", [None, b"an attacker's own key, 32 bytes"], ids=["unsigned", "wrong-key"]
)
def test_18_a_planted_pickle_never_runs_on_resume(
    traced: Any, tmp_path: Path, reader: str, signed_with: bytes | None, version: int
) -> None:
    marker = tmp_path / "pwned"
    exporter = FileBlobExporter(tmp_path / "blobs")
    if reader == "json-default":
        store = CheckpointStore(exporter)
    else:
        store = CheckpointStore(exporter, serializer="pickle", hmac_key=HMAC_KEY)
    traced.client.checkpoints = store
    exporter.put(
        store.key("victim", new_checkpoint_id()), planted_pickle(marker, key=signed_with, version=version)
    )

    with pytest.raises(CheckpointError), multirun.resume(run_id="victim"):
        pass
    assert not marker.exists()


@pytest.mark.parametrize("version", [2, 3])
def test_18_the_planted_pickle_runs_when_signed_with_the_readers_key(tmp_path: Path, version: int) -> None:
    # The control for the test above: the forged blob is a real one, refused there by the checks.
    marker = tmp_path / "pwned"
    exporter = FileBlobExporter(tmp_path / "blobs")
    store = CheckpointStore(exporter, serializer="pickle", hmac_key=HMAC_KEY)
    checkpoint_id = new_checkpoint_id()
    blob = planted_pickle(marker, key=HMAC_KEY.encode(), version=version)
    exporter.put(store.key("victim", checkpoint_id), blob)
    with pytest.raises(ReplayError):  # it ran, and then is no checkpoint document
        store.load(checkpoint_id)
    assert marker.is_dir()


# ---------------------------------------------------------------------------
# 19. oversized blobs and decompression bombs


def peak_memory(action: Any) -> int:
    tracemalloc.start()
    try:
        action()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


def test_19_an_oversized_file_checkpoint_is_refused_without_being_read(traced: Any, tmp_path: Path) -> None:
    store = CheckpointStore(FileBlobExporter(tmp_path / "blobs"), max_blob_bytes=1 << 20)
    checkpoint_id = new_checkpoint_id()
    path = tmp_path / "blobs" / store.key("run-1", checkpoint_id)
    path.parent.mkdir(parents=True)
    with path.open("wb") as out:  # 64 MiB, as a runaway state or an attacker would leave it
        out.truncate(64 << 20)

    def load() -> None:
        with pytest.raises(CheckpointError, match="over the 1048576-byte limit"):
            store.load(checkpoint_id)

    assert peak_memory(load) < 1 << 20


def test_19_an_oversized_s3_checkpoint_is_refused_without_being_downloaded(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    exporter = exporter_from_uri(s3_server.uri(f"big-{uuid.uuid4().hex[:8]}"))
    store = CheckpointStore(exporter, max_blob_bytes=1 << 20)
    checkpoint_id = new_checkpoint_id()
    exporter.put(store.key("run-1", checkpoint_id), bytes(16 << 20))

    def load() -> None:
        with pytest.raises(CheckpointError, match="over the 1048576-byte limit"):
            store.load(checkpoint_id)

    assert peak_memory(load) < 4 << 20


def test_19_a_decompression_bomb_in_the_store_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    packer = zlib.compressobj(9)
    chunk = b"\x00" * (1 << 20)
    stored = b"".join(packer.compress(chunk) for _ in range(256)) + packer.flush()  # 256 MiB of zeros
    assert len(stored) < 1 << 20
    header = {
        "compression": "zlib",
        "digest": "sha256:" + hashlib.sha256(stored).hexdigest(),
        "serializer": "json",
        "size": len(stored),
        "version": 2,
    }
    blob = MAGIC + json.dumps(header, separators=(",", ":"), sort_keys=True).encode() + b"\n" + stored
    store = CheckpointStore(FileBlobExporter(tmp_path / "blobs"), max_blob_bytes=4 << 20)
    checkpoint_id = new_checkpoint_id()
    store.exporter.put(store.key("run-1", checkpoint_id), blob)

    def load() -> None:
        with pytest.raises(CheckpointError, match="decompresses to more than"):
            store.load(checkpoint_id)

    assert peak_memory(load) < 16 << 20  # the limit and the compressed blob, never the 256 MiB


def test_19_the_checkpoint_size_limit_comes_from_init_or_its_variable(
    traced: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    def client(**options: Any) -> multirun.MultiRunClient:
        return multirun.init(tracer_provider=traced.provider, checkpoint_uri=str(tmp_path), **options)

    assert client().checkpoints.max_blob_bytes == 1 << 30
    assert client(checkpoint_max_bytes=3 << 30).checkpoints.max_blob_bytes == 3 << 30  # over 1 GiB
    monkeypatch.setenv("MULTIRUN_CHECKPOINT_MAX_BYTES", "5000")
    assert client().checkpoints.max_blob_bytes == 5000
    assert client(checkpoint_max_bytes=7000).checkpoints.max_blob_bytes == 7000  # the argument wins
    for bad in (0, -1, True, 1.5, "4096"):
        with pytest.raises(ConfigurationError, match=r"^checkpoint_max_bytes must be an int >= 1"):
            client(checkpoint_max_bytes=bad)
    monkeypatch.setenv("MULTIRUN_CHECKPOINT_MAX_BYTES", "1GiB")
    with pytest.raises(
        ConfigurationError, match=r"^MULTIRUN_CHECKPOINT_MAX_BYTES must be an int >= 1, got '1GiB'"
    ):
        client()
    with pytest.raises(ConfigurationError, match="max_blob_bytes must be an int >= 1"):
        CheckpointStore(FileBlobExporter(tmp_path), max_blob_bytes=0)


def big_job() -> Any:
    """A run whose state makes a checkpoint of about 10 kB."""

    @run(name="big")
    def job() -> str:
        ctx = get_current_run_context()
        ctx.set_state("notes", "x" * 10_000)
        ctx.checkpoint(name="notes")
        return ctx.run.id

    return job


def test_19_a_checkpoint_over_the_limit_is_not_written_and_says_how_to_raise_it(
    traced: Any, tmp_path: Path, caplog: Any
) -> None:
    # it used to be written, and every later load refused it: a checkpoint that looked taken
    client = multirun.init(
        tracer_provider=traced.provider, checkpoint_uri=str(tmp_path / "small"), checkpoint_max_bytes=4096
    )
    with pytest.raises(CheckpointError) as refused:
        big_job()()
    message = str(refused.value)
    assert re.search(
        r"checkpoint 'notes' of run \w+ is not written: it is 1\d{4} bytes, over the 4096-byte limit", message
    )
    assert "MULTIRUN_CHECKPOINT_MAX_BYTES or multirun.init(checkpoint_max_bytes=...)" in message
    assert client.checkpoints.list() == []

    @step(checkpoint=True)
    def draft() -> str:
        return "y" * 10_000

    @run
    def job() -> int:
        return len(draft())

    with caplog.at_level(logging.WARNING, logger="multirun"):
        assert job() == 10_000  # a checkpoint multirun takes itself: a warning, never the run's error
    [warning] = [r.getMessage() for r in caplog.records if "after_draft" in r.getMessage()]
    assert "over the 4096-byte limit" in warning and "MULTIRUN_CHECKPOINT_MAX_BYTES" in warning
    assert client.checkpoints.list() == []


def test_19_a_compressed_checkpoint_is_held_to_the_limit_once_decompressed(
    traced: Any, tmp_path: Path
) -> None:
    store = CheckpointStore(FileBlobExporter(tmp_path / "zlib"), compression="zlib", max_blob_bytes=4096)
    traced.client.checkpoints = store
    with pytest.raises(
        CheckpointError, match=r"it is \d{3} bytes, 1\d{4} once decompressed, over the 4096-byte"
    ):
        big_job()()  # it used to be written, and refused when read: it decompresses past the limit
    assert store.list() == []
    store.max_blob_bytes = 1 << 20
    run_id = big_job()()
    [key] = store.list()
    restored = store.load(key.split("/")[-1].removesuffix(".ckpt"))
    assert restored.checkpoint.run_id == run_id


def test_19_resume_reads_with_the_configured_limit_and_says_how_to_raise_it(
    traced: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    run_id = big_job()()
    size = (tmp_path / "blobs" / traced.client.checkpoints.list()[0]).stat().st_size

    def client(**options: Any) -> None:
        multirun.init(tracer_provider=traced.provider, checkpoint_uri=str(tmp_path / "blobs"), **options)

    client(checkpoint_max_bytes=size - 1)
    with pytest.raises(CheckpointError) as refused, multirun.resume(run_id=run_id):
        pass
    message = str(refused.value)
    assert f"is {size} bytes, over the {size - 1}-byte limit" in message
    assert (
        "raise the limit (MULTIRUN_CHECKPOINT_MAX_BYTES or multirun.init(checkpoint_max_bytes=...)" in message
    )

    monkeypatch.setenv("MULTIRUN_CHECKPOINT_MAX_BYTES", str(size))  # a checkpoint of the limit exactly
    client()
    with multirun.resume(run_id=run_id) as restored:
        assert restored.state["notes"] == "x" * 10_000


def test_19_the_command_line_reads_with_the_limit_of_the_variable(
    traced: Any, tmp_path: Path, monkeypatch: Any, capsys: Any
) -> None:
    from multirun.cli.main import main

    big_job()()
    [key] = traced.client.checkpoints.list()
    checkpoint_id, size = key.split("/")[-1].removesuffix(".ckpt"), (tmp_path / "blobs" / key).stat().st_size
    store = ["--store", str(tmp_path / "blobs")]
    monkeypatch.setenv("MULTIRUN_CHECKPOINT_MAX_BYTES", "4096")
    assert main(["checkpoints", "show", checkpoint_id, *store]) == 1
    err = capsys.readouterr().err
    assert f"is {size} bytes, over the 4096-byte limit" in err and "MULTIRUN_CHECKPOINT_MAX_BYTES" in err
    assert main(["checkpoints", "verify", *store]) == 1
    assert f"is {size} bytes, over the 4096-byte limit" in capsys.readouterr().out
    monkeypatch.setenv("MULTIRUN_CHECKPOINT_MAX_BYTES", str(size))
    assert main(["checkpoints", "verify", *store]) == 0
    capsys.readouterr()
    monkeypatch.setenv("MULTIRUN_CHECKPOINT_MAX_BYTES", "lots")
    assert main(["checkpoints", "verify", *store]) == 1
    assert "MULTIRUN_CHECKPOINT_MAX_BYTES must be an int >= 1, got 'lots'" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# 20. ids and names that would escape the store


@settings(max_examples=300, deadline=None)
@given(run_id=st.text(max_size=300), checkpoint_id=st.text(max_size=40))
@example(run_id="0", checkpoint_id="0\n")  # found by hypothesis: "$" in the id pattern let "\n" through
@example(run_id="run\n", checkpoint_id="0")
def test_20_any_id_is_refused_or_stays_inside_the_store(run_id: str, checkpoint_id: str) -> None:
    root = Path("/srv/multirun-blobs")
    exporter = FileBlobExporter(root)
    try:
        key = CheckpointStore.key(run_id, checkpoint_id)
    except CheckpointError:
        return
    path = exporter._path(key).resolve()
    assert path.is_relative_to(root)
    assert "\x00" not in key and ".." not in key.split("/")
    assert len(run_id) <= 128 and len(checkpoint_id) <= 128


@pytest.mark.parametrize("bad", ["key\n", "checkpoints/x/y.ckpt\n", "a/\n"])
def test_20_blob_keys_and_prefixes_with_a_final_newline_are_refused(bad: str) -> None:
    with pytest.raises(CheckpointError):
        validate_key(bad)
    with pytest.raises(CheckpointError):
        validate_prefix(bad)


@pytest.mark.parametrize("bad", ["../../etc", "/etc/passwd", "a\x00b", "x" * 300, "..", "a/b", ""])
def test_20_resume_refuses_ids_that_would_escape(traced: Any, bad: str) -> None:
    with pytest.raises(CheckpointError), multirun.resume(run_id=bad):
        pass
    with pytest.raises(CheckpointError), multirun.resume(checkpoint_id=bad):
        pass


@pytest.mark.parametrize("bad", ["x" * 257, "a\x00b", "", "   "])
def test_20_names_that_are_too_long_or_hold_nul_are_refused(traced: Any, bad: str) -> None:
    for decorator in (run, step, checkpoint):
        with pytest.raises(ConfigurationError, match="name"):
            decorator(name=bad)(lambda: None)

    if not bad:
        return  # ctx.checkpoint(name="") is the default name, "checkpoint"

    @run
    def job() -> None:
        get_current_run_context().checkpoint(name=bad)

    with pytest.raises(CheckpointError, match="checkpoint name"):
        job()


# ---------------------------------------------------------------------------
# 22. input hashes: stable everywhere, surrogates handled

json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(value=st.dictionaries(st.text(max_size=10), json_like, max_size=6))
def test_22_dict_order_never_changes_the_hash(value: dict[str, Any]) -> None:
    reordered = dict(reversed(list(value.items())))
    assert input_hash((value,), {}) == input_hash((reordered,), {})
    assert input_hash((), value) == input_hash((), reordered)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.characters(codec=None), max_size=50))
def test_22_any_text_with_lone_surrogates_hashes(text: str) -> None:
    digest = input_hash((text,), {})
    assert digest is not None and digest != input_hash((text + "x",), {})


HASH_IN_A_PROCESS = r"""
import pickle, sys, json
from multirun.checkpoints.hashing import input_hash
values = pickle.loads(sys.stdin.buffer.read())
print(json.dumps([input_hash((v,), {}) for v in values]))
"""


@settings(max_examples=3, deadline=None)
@given(values=st.lists(json_like, min_size=20, max_size=20))
def test_22_the_hash_of_any_value_is_the_same_in_another_process_and_hash_seed(values: list[Any]) -> None:
    here = [input_hash((v,), {}) for v in values]
    for seed in ("0", "4242"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        done = subprocess.run(
            [sys.executable, "-c", HASH_IN_A_PROCESS],
            input=pickle.dumps(values),
            capture_output=True,
            env=env,
            check=True,
            timeout=60,
        )
        assert json.loads(done.stdout) == here


def test_22_a_surrogate_in_a_replayed_result_comes_back_as_it_was(traced: Any) -> None:
    calls: list[str] = []

    @step
    def echo(text: str) -> str:
        calls.append(text)
        return text + "\udfff"

    @run
    def job() -> str:
        echo("\ud800 lone")
        get_current_run_context().checkpoint(name="after")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        job()
    run_id = traced.named("invoke_workflow job")[0].attributes["multirun.run.id"]

    @run(name="job")  # the same program
    def again() -> str:
        return echo("\ud800 lone")

    with multirun.resume(run_id=run_id):
        assert again() == "\ud800 lone\udfff"
    assert calls == ["\ud800 lone"]


@pytest.mark.parametrize("kind", ["memory", "file", "s3"])
def test_19_every_built_in_exporter_tells_a_blobs_size_without_reading_it(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    from multirun.checkpoints.exporters import BlobNotFoundError

    if kind == "memory":
        exporter: Any = MemoryBlobExporter("sizes")
    elif kind == "file":
        exporter = FileBlobExporter(tmp_path / "blobs")
    else:
        server = request.getfixturevalue("s3_server")
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        exporter = exporter_from_uri(server.uri(f"size-{uuid.uuid4().hex[:8]}"))
    uri = exporter.put("a/b.ckpt", b"x" * 1234)
    assert exporter.size(uri) == exporter.size("a/b.ckpt") == 1234
    with pytest.raises(BlobNotFoundError):
        exporter.size("a/missing.ckpt")


# ---------------------------------------------------------------------------
# 7. a blob store that hangs: the program waits checkpoint_timeout at most


class HangingExporter(MemoryBlobExporter):
    """A store whose put hangs until ``release`` is set (a store that stopped answering)."""

    def __init__(self) -> None:
        super().__init__("hanging")
        self.release = threading.Event()
        self.puts = 0

    def put(self, key: str, data: bytes) -> str:
        self.puts += 1
        self.release.wait()
        return super().put(key, data)


def join_checkpoint_writes() -> None:
    for thread in threading.enumerate():
        if thread.name == "multirun-checkpoint-put":
            thread.join()


def test_7_a_hung_blob_store_costs_a_warning_and_holds_one_thread(traced: Any, caplog: Any) -> None:
    exporter = HangingExporter()
    traced.client.checkpoints = CheckpointStore(exporter, put_timeout=0.01)

    @step(checkpoint=True)
    def stage(x: int) -> int:
        return x

    @checkpoint(name="noted")
    def note(x: int) -> int:
        return x

    @run
    def failing() -> None:
        stage(3)
        raise RuntimeError("boom")  # and its on-error checkpoint

    @run
    def job() -> int:
        return note(stage(1)) + stage(2)

    try:
        with caplog.at_level(logging.WARNING, logger="multirun"):
            with pytest.raises(RuntimeError, match="boom"):
                failing()
            assert job() == 3  # every checkpoint failed, nothing else did
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert sum("did not write checkpoint" in w and "checkpoint_timeout" in w for w in warnings) == 1
        # while the first write hangs, the others are refused at once: one put, one thread, one blob
        assert sum("no checkpoint is written until it does" in w for w in warnings) == 4
        assert exporter.puts == 1
    finally:
        exporter.release.set()
        join_checkpoint_writes()
    assert any("wrote checkpoint" in r.getMessage() and "after all" in r.getMessage() for r in caplog.records)
    assert len(exporter.list("checkpoints/")) == 1  # the hung write completed in the background

    # the store answers again: checkpoints are written as before
    assert job() == 3
    assert len(exporter.list("checkpoints/")) == 4


def test_7_an_explicit_checkpoint_to_a_hung_store_raises_instead_of_hanging(traced: Any) -> None:
    exporter = HangingExporter()
    traced.client.checkpoints = CheckpointStore(exporter, put_timeout=0.01)

    @run
    def job() -> None:
        get_current_run_context().checkpoint(name="explicit")

    try:
        with pytest.raises(CheckpointError, match="checkpoint_timeout"):
            job()
    finally:
        exporter.release.set()
        join_checkpoint_writes()


class ThreadNotingExporter(MemoryBlobExporter):
    """A store that notes the thread each put runs in, and fails while ``failure`` is set."""

    def __init__(self) -> None:
        super().__init__("noting")
        self.threads: list[threading.Thread] = []
        self.failure: Exception | None = None

    def put(self, key: str, data: bytes) -> str:
        self.threads.append(threading.current_thread())
        if self.failure is not None:
            raise self.failure
        return super().put(key, data)


def test_7_without_a_timeout_the_checkpoint_is_written_in_the_callers_thread(traced: Any) -> None:
    exporter = ThreadNotingExporter()
    traced.client.checkpoints = CheckpointStore(exporter, put_timeout=None)

    @run
    def job() -> str:
        return get_current_run_context().checkpoint(name="explicit").value.id

    checkpoint_id = job()
    assert exporter.threads == [threading.current_thread()]
    assert traced.client.checkpoints.load(checkpoint_id).checkpoint.id == checkpoint_id
    exporter.failure = BlobStoreUnavailableError("the disk is full")
    with pytest.raises(BlobStoreUnavailableError, match="the disk is full"):
        job()


def test_7_the_checkpoint_timeout_comes_from_init_or_its_variable(
    traced: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    client = multirun.init(
        tracer_provider=traced.provider, checkpoint_uri=str(tmp_path), checkpoint_timeout=2.5
    )
    assert client.checkpoints.put_timeout == 2.5
    monkeypatch.setenv("MULTIRUN_CHECKPOINT_TIMEOUT", "0.5")
    client = multirun.init(tracer_provider=traced.provider, checkpoint_uri=str(tmp_path))
    assert client.checkpoints.put_timeout == 0.5
    monkeypatch.setenv("MULTIRUN_CHECKPOINT_TIMEOUT", "soon")
    with pytest.raises(ConfigurationError, match="MULTIRUN_CHECKPOINT_TIMEOUT"):
        multirun.init(tracer_provider=traced.provider, checkpoint_uri=str(tmp_path))


FORK_DURING_A_HUNG_WRITE = """
import os, signal, socket, sys, threading, time
import multirun
from opentelemetry.sdk.trace import TracerProvider
from multirun import run
from multirun.context import get_current_run_context
from multirun.errors import CheckpointError

# the S3 server behind a proxy that holds what is sent to it while `stalled` is set
stalled = threading.Event()
stalled.set()
listener = socket.create_server(("127.0.0.1", 0))

def pipe(source, sink, upload):
    while data := source.recv(65536):
        while upload and stalled.is_set():
            time.sleep(0.01)
        sink.sendall(data)

def serve():
    while True:
        client, _ = listener.accept()
        server = socket.create_connection(("127.0.0.1", int(sys.argv[2])))
        threading.Thread(target=pipe, args=(client, server, True), daemon=True).start()
        threading.Thread(target=pipe, args=(server, client, False), daemon=True).start()

threading.Thread(target=serve, daemon=True).start()
endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
multirun.init(
    tracer_provider=TracerProvider(),
    checkpoint_uri=f"{sys.argv[1]}?endpoint_url={endpoint}&conditional_put=on",
    checkpoint_timeout=1,
)

@run
def job():
    get_current_run_context().checkpoint(name="c")

try:
    job()
except CheckpointError as exc:
    print("parent:", exc, flush=True)
pid = os.fork()  # while the parent's write hangs: a worker of a pool, say
if pid == 0:
    signal.alarm(30)  # a child that hangs must not outlive the test
    try:
        job()
        print("child: written", flush=True)
    except CheckpointError as exc:
        print("child:", exc, flush=True)
    os._exit(0)
stalled.clear()  # the store answers again
os.waitpid(pid, 0)
"""


def test_7_a_child_forked_while_a_write_hangs_writes_its_own_checkpoints(s3_server: S3Server) -> None:
    # the child inherited the parent's hung write, which no thread of the child would ever end:
    # each of its checkpoints was refused, for good, "until it ends"
    done = subprocess.run(
        [
            sys.executable,
            "-W",
            "ignore::DeprecationWarning",
            "-c",
            FORK_DURING_A_HUNG_WRITE,
            f"s3://{s3_server.BUCKET}/fork-{uuid.uuid4().hex[:8]}",
            str(s3_server.ports["s3"]),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**environment_without_settings(), **s3_server.env()},
    )
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and "within 1 s (checkpoint_timeout)" in lines[0], (lines, done.stderr)
    assert lines[1] == "child: written", (lines, done.stderr)
