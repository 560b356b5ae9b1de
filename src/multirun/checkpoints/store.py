"""CheckpointStore: turns run state into verified blobs and back.

A checkpoint holds the run's state (``set_state``), its agents' states (each
agent's ``set_state``, by agent name and occurrence), the replay cache of
completed idempotent steps, and what the run had spent, serialized as JSON
(pydantic models and dataclasses become plain data), sealed in an envelope
(see ``envelope``) and handed to a blob exporter under
``checkpoints/<run id>/<checkpoint id>.ckpt``.

A checkpoint of a serializer that can run code (pickle, cloudpickle) also
carries a summary in the blob's meta section (``summary_of``): its state
keys, agents, replay log and spend, in JSON. ``describe`` reads that, so
``multirun checkpoints show`` and ``verify`` never unpickle the state, whose
classes may live in the ``__main__`` of the program that wrote it. One written
before that summary existed (format version 3 and before) is unpickled; if its
classes are not there to unpickle it, ``describe`` says so (``unread``) with
what the envelope tells: format version, run id, size, and that its HMAC and
digests verified.

The store writes every blob with a meta section (format version 4): a JSON
checkpoint's is a short one naming it (id, run, run name, name, time). ``name_of``
reads a checkpoint's name from the start of its blob, so ``multirun
checkpoints`` names the checkpoints of a run killed before its spans were
written without reading whole blobs. A JSON checkpoint written before (version
3 and before) has no name to read there.

A checkpoint is at most ``max_blob_bytes`` (``init(checkpoint_max_bytes=...)`` or
MULTIRUN_CHECKPOINT_MAX_BYTES, 1 GiB by default), stored and decompressed: a larger
one is refused when it is read (before it is read, where the store tells a blob's
size), and so it is not written either, since it could not be read back: the
CheckpointError says its size, the limit and how to raise it.

The exporter's ``put`` runs in a thread of its own, and a checkpoint waits for
it at most ``put_timeout`` seconds (``init(checkpoint_timeout=...)``, 15 by
default): a store that hangs or is slow then costs the program that wait and
a CheckpointError (a warning, for the checkpoints multirun takes itself), never
more. The write goes on in the background, and until it ends later checkpoints
are refused at once, so a hung store holds one thread and one blob at most
(per checkpoint taken side by side when it hung).

While that thread writes, the checkpoint's own thread computes the payload's
digest (and the HMAC) for the header: an exporter with ``put_pending`` (the file
store) writes and syncs the body meanwhile, and the header last, before the blob
gets its name; any other is given the whole blob once the digest is known.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from opentelemetry.instrumentation.utils import suppress_instrumentation

from multirun.checkpoints.envelope import (
    MAX_BYTES_SETTINGS,
    PARALLEL_DIGEST_BYTES,
    PendingBlob,
    needs_hmac,
    open_meta,
    peek_meta,
)
from multirun.checkpoints.exporters import BlobExporter, BlobNotFoundError, BlobStoreUnavailableError
from multirun.checkpoints.replay import RUN_PREFIX, check_records, records_from_v1
from multirun.checkpoints.serializers import get_serializer, load_blob, resolve_hmac_key
from multirun.errors import CheckpointError, ConfigurationError, ReplayError
from multirun.models.checkpoint import Checkpoint, CheckpointMeta

if TYPE_CHECKING:
    from multirun.context import RunContext

_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}\Z")  # \Z: "$" would let a final newline in
DEFAULT_MAX_BLOB_BYTES = 1 << 30
# above the S3 exporter's own bound (~12 s), so that its clearer error comes first
DEFAULT_PUT_TIMEOUT = 15.0
MAX_PUT_TIMEOUT = 1e9  # the longest put_timeout accepted, in seconds


_last_id_ns = 0
_id_lock = threading.Lock()


_GENERATED_ID = re.compile(r"[0-9a-f]{32}\Z")
_PLAUSIBLE_NS = (946_684_800 * 10**9, 7_258_118_400 * 10**9)  # years 2000 to 2200


def created_ns(checkpoint_id: str) -> int | None:
    """When the checkpoint was taken, read from its id (``new_checkpoint_id``: 16 hex digits of
    time, then 16 random); None for an id multirun did not make."""
    if not _GENERATED_ID.match(checkpoint_id):
        return None
    ns = int(checkpoint_id[:16], 16)
    return ns if _PLAUSIBLE_NS[0] <= ns < _PLAUSIBLE_NS[1] else None


def new_checkpoint_id() -> str:
    """A new checkpoint id: 16 hex digits of time, then 16 random, so ids sort by creation.

    The time never goes back within a process, even when the wall clock is set
    back, so the newest checkpoint of a run is always the one ``latest`` finds.
    """
    global _last_id_ns
    with _id_lock:
        _last_id_ns = now = max(time.time_ns(), _last_id_ns + 1)
    return f"{now:016x}{random.getrandbits(64):016x}"


def validate_id(value: str, what: str) -> str:
    """Refuse ids that could escape a key: ``../x``, ``/abs``, NUL, over 128 characters."""
    if not isinstance(value, str) or not _ID.match(value) or ".." in value:
        raise CheckpointError(
            f"invalid {what} {value!r}: use 1 to 128 letters, digits, '_', '-' or '.', no '..'"
        )
    return value


_logger = logging.getLogger(__name__)


def validate_name(name: str) -> str:
    """Refuse checkpoint names that are empty, over 256 characters or hold NUL (as decorators do)."""
    if not isinstance(name, str) or not name.strip() or len(name) > 256 or "\x00" in name:
        shown = name if not isinstance(name, str) or len(name) <= 80 else name[:80] + "..."
        raise CheckpointError(f"invalid checkpoint name {shown!r}: use 1 to 256 characters, no NUL")
    return name


@dataclass
class RestoredCheckpoint:
    """A checkpoint read back and verified: what a run needs to go on from it."""

    checkpoint: Checkpoint
    state: dict[str, Any]
    replay: list[dict[str, Any]]  # ReplayLog records
    ledger: dict[str, int]
    uri: str
    trace: dict[str, str]  # trace_id and span_id (hex) of the run that took it
    sub_run_id: str = ""  # the sub-run that took it, when a sub-run did (the run is its top run)
    sub_run_seq: int | None = None  # that sub-run's call in the replay records
    # the run's agents' states: {"name", "occurrence", "state"} (RunContext.agent_states)
    agents: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class CheckpointSummary:
    """What a checkpoint holds, read and verified without deserializing its contents if it can be."""

    checkpoint: Checkpoint  # without its state_data
    uri: str
    state_keys: list[str]
    agents: list[tuple[str, int, list[str]]]  # name, occurrence, state keys
    replay_steps: int
    replay_results: int  # the steps with a result to serve
    ledger: dict[str, int]
    trace: dict[str, str]
    version: int = 0  # the blob's format version
    compression: str = "none"
    signature: str = ""  # "unsigned", "signed: HMAC verified" or "signed: HMAC not checked (no key set)"
    # why the contents were not read, if they were not: then the checkpoint has only what the
    # blob's key and envelope tell (its id, run id, serializer, size; created_at from its id, else
    # the epoch), and state_keys, agents, replay, ledger and trace are empty
    unread: str = ""

    @classmethod
    def of(cls, restored: RestoredCheckpoint) -> CheckpointSummary:
        """The summary of a checkpoint that was loaded whole."""
        return cls(
            checkpoint=restored.checkpoint.model_copy(update={"state_data": b""}),
            uri=restored.uri,
            state_keys=sorted(restored.state),
            agents=[(a["name"], a["occurrence"], sorted(a["state"])) for a in restored.agents],
            replay_steps=len(restored.replay),
            replay_results=sum(1 for record in restored.replay if "result" in record),
            ledger=restored.ledger,
            trace=restored.trace,
        )


def summary_of(document: dict[str, Any]) -> dict[str, Any]:
    """The meta section of a checkpoint's blob: what ``describe`` shows of ``document``, as JSON."""
    replay = document["replay"]
    return {
        "checkpoint": document["checkpoint"],
        "state_keys": sorted(map(str, document["state"])),
        "agents": [
            {
                "name": entry["name"],
                "occurrence": entry["occurrence"],
                "state_keys": sorted(map(str, entry["state"])),
            }
            for entry in document["agents"]
        ],
        "replay": {"steps": len(replay), "results": sum(1 for record in replay if "result" in record)},
        "ledger": document["ledger"],
        "trace": document["trace"],
    }


def _named(document: dict[str, Any]) -> dict[str, Any]:
    """The meta section of a JSON checkpoint's blob: what names it, for a listing that reads
    the start of each blob (``name_of``). Not a summary: ``describe`` reads a JSON payload."""
    about = document["checkpoint"]
    return {"checkpoint": {name: about[name] for name in ("id", "run_id", "run_name", "name", "created_at")}}


def _checkpoint_of(
    about: dict[str, Any], header: dict[str, Any], size: int, state_data: bytes = b""
) -> Checkpoint:
    """The Checkpoint model of a blob, from its ``checkpoint`` object (in its document, or in
    its meta section) and its header; ValueError if that object is not one."""
    for name in ("id", "run_id", "created_at"):
        if name not in about:
            raise ValueError(f"its checkpoint has no {name!r}")
    return Checkpoint(
        id=about["id"],
        run_id=about["run_id"],
        agent_id=about.get("agent_id", ""),
        step_id=about.get("step_id", ""),
        name=about.get("name", ""),
        state_data=state_data,
        state_format=header["serializer"],
        context=_context(about),
        environment=about.get("environment", {}),
        created_at=about["created_at"],
        size_bytes=size,
    )


def _context(about: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``context``: the name of the run that took it and, when its arguments
    had an input hash, that hash (``run_input_hash``) and the run's number among the runs of
    its name its process started (``run_occurrence``)."""
    context: dict[str, Any] = {"run_name": about.get("run_name", "")}
    digest, occurrence = about.get("run_input_hash"), about.get("run_occurrence")
    if isinstance(digest, str):
        context["run_input_hash"] = digest
        if isinstance(occurrence, int) and not isinstance(occurrence, bool):
            context["run_occurrence"] = occurrence
    return context


def _summary_from_meta(
    meta: dict[str, Any], header: dict[str, Any], uri: str, size: int
) -> CheckpointSummary:
    """A summary read back from a blob's meta section (``summary_of``); KeyError, TypeError or
    ValueError if it is not one."""
    checkpoint = _checkpoint_of(_json_object(meta, "checkpoint", required=True), header, size)
    agents = []
    for entry in _json_list(meta, "agents"):
        name, occurrence, keys = entry["name"], entry["occurrence"], entry["state_keys"]
        if not isinstance(name, str) or type(occurrence) is not int or not isinstance(keys, list):
            raise ValueError(f"malformed agent {str(entry)[:80]!r}")
        agents.append((name, occurrence, [str(key) for key in keys]))
    replay = _json_object(meta, "replay")
    return CheckpointSummary(
        checkpoint=checkpoint,
        uri=uri,
        state_keys=[str(key) for key in _json_list(meta, "state_keys")],
        agents=agents,
        replay_steps=int(replay.get("steps", 0)),
        replay_results=int(replay.get("results", 0)),
        ledger={k: int(v) for k, v in _json_object(meta, "ledger").items()},
        trace={k: str(v) for k, v in _json_object(meta, "trace").items()},
    )


def _unread_summary(
    checkpoint_id: str, key: str, size: int, header: dict[str, Any], cause: BaseException
) -> CheckpointSummary:
    """What is known of a verified checkpoint whose contents could not be unpickled here: what
    its key and envelope tell."""
    found = parse_checkpoint_key(key)
    ns = created_ns(checkpoint_id) or 0
    checkpoint = Checkpoint(
        id=checkpoint_id,
        run_id=found.run_id if found is not None else "",
        state_format=header["serializer"],
        created_at=datetime.fromtimestamp(ns / 1e9, timezone.utc),
        size_bytes=size,
    )
    unread = (
        f"they need the classes of the program that wrote them ({type(cause).__name__}: {cause}), "
        f"and format version {header['version']} keeps no summary of them"
    )
    return CheckpointSummary(checkpoint, key, [], [], 0, 0, {}, {}, unread=unread)


class StoredCheckpoint(NamedTuple):
    """A checkpoint in the store, as its key names it: ``checkpoints/<run id>/<checkpoint id>.ckpt``."""

    run_id: str
    checkpoint_id: str


def parse_checkpoint_key(key: str) -> StoredCheckpoint | None:
    """The run and checkpoint ids of a checkpoint's key; None for any other key (a stray file)."""
    parts = key.split("/")
    if len(parts) != 3 or parts[0] != "checkpoints" or not parts[2].endswith(".ckpt"):
        return None
    run_id, checkpoint_id = parts[1], parts[2].removesuffix(".ckpt")
    try:
        validate_id(run_id, "run id")
        validate_id(checkpoint_id, "checkpoint id")
    except CheckpointError:
        return None
    return StoredCheckpoint(run_id, checkpoint_id)


class CheckpointStore:
    """Saves and loads checkpoints through one blob exporter."""

    def __init__(
        self,
        exporter: BlobExporter,
        *,
        serializer: str = "json",
        hmac_key: bytes | str | None = None,
        compression: Literal["none", "zlib"] = "none",
        max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
        put_timeout: float | None = DEFAULT_PUT_TIMEOUT,
        read_serializers: Collection[str] = (),
    ) -> None:
        """``serializer`` is ``json`` (default), or ``pickle``/``cloudpickle``, which need an
        HMAC key (``hmac_key`` or MULTIRUN_CHECKPOINT_HMAC_KEY): blobs are signed, and a reader
        refuses any pickle it cannot verify. ``put_timeout``: the longest a checkpoint waits for
        the exporter's ``put`` (seconds; None: as long as it takes, in the caller's thread).
        ``load`` reads blobs of ``json``, ``serializer`` and ``read_serializers``.
        ``max_blob_bytes``: the largest checkpoint read or written, stored and decompressed."""
        if isinstance(max_blob_bytes, bool) or not isinstance(max_blob_bytes, int) or max_blob_bytes < 1:
            raise ConfigurationError(f"max_blob_bytes must be an int >= 1 (bytes), got {max_blob_bytes!r}")
        if put_timeout is not None and (
            isinstance(put_timeout, bool)
            or not isinstance(put_timeout, (int, float))
            or not 0 < put_timeout < MAX_PUT_TIMEOUT
        ):
            raise ConfigurationError(
                f"checkpoint_timeout must be a number of seconds > 0, got {put_timeout!r}"
            )
        self.put_timeout = put_timeout
        self._writes_lock = threading.Lock()
        self._hung: set[_Write] = set()  # writes that outlived put_timeout and have not ended
        self._unwritable_steps: set[str] = set()  # steps whose result was left out (warned once)
        self._unhashed_steps: set[str] = set()  # steps with no input hash (warned once)
        self.exporter = exporter
        self.max_blob_bytes = max_blob_bytes
        self.compression: Literal["none", "zlib"] = compression
        self._hmac_key = resolve_hmac_key(hmac_key)
        self._serializer = get_serializer(serializer, hmac_key=self._hmac_key)
        self._allowed = tuple(dict.fromkeys(("json", self._serializer.name, *read_serializers)))

    @staticmethod
    def key(run_id: str, checkpoint_id: str) -> str:
        return (
            f"checkpoints/{validate_id(run_id, 'run id')}/{validate_id(checkpoint_id, 'checkpoint id')}.ckpt"
        )

    def save(
        self,
        run: RunContext,
        *,
        name: str,
        extra_state: dict[str, Any] | None = None,
        agent_id: str = "",
        step_id: str = "",
    ) -> CheckpointMeta:
        """Serialize ``run``'s state and replay cache and store them; returns the metadata.

        A sub-run's checkpoint is one of the run it belongs to (``run.root``, the top run in
        this process): resuming that run restores the sub-run with it, from its record in the
        replay log, which keeps the sub-run's state and spend.
        """
        validate_name(name)
        sub_run, run = run, run.root
        state = dict(run.state)
        extra_for_sub_run = None
        if extra_state:
            if sub_run is not run and sub_run.replay_parent is not None:
                extra_for_sub_run = (sub_run.replay_parent, extra_state)
            else:
                state.update(extra_state)
        checkpoint_id = new_checkpoint_id()
        created = datetime.now(timezone.utc)
        document = {
            "checkpoint": {
                "id": checkpoint_id,
                "run_id": run.run.id,
                "run_name": run.run.name,
                "run_input_hash": run.input_digest,
                "run_occurrence": run.occurrence,
                "sub_run_id": sub_run.run.id if sub_run is not run else "",
                "sub_run_seq": sub_run.replay_parent if sub_run is not run else None,
                "agent_id": agent_id,
                "step_id": step_id,
                "name": name,
                "created_at": created.isoformat(),
                "environment": _environment(),
            },
            "state": state,
            "agents": run.agent_states(),
            "replay": run.replay_log.to_records(extra_for_sub_run),
            "trace": _trace_of(run),
            "ledger": run.ledger.totals(),
        }
        blob, payload_size = self._dump(document, name)
        self._check_size(name, run.run.id, blob.size, payload_size)
        uri = self._put(self.key(run.run.id, checkpoint_id), blob)
        self._warn_unhashed(run.replay_log.unhashed)
        return CheckpointMeta(
            id=checkpoint_id,
            run_id=run.run.id,
            agent_id=agent_id,
            step_id=step_id,
            name=name,
            created_at=created,
            size_bytes=blob.size,
            uri=uri,
            digest=blob.digest,
            serializer=self._serializer.name,
        )

    def _put(self, key: str, blob: PendingBlob) -> str:
        """``exporter.put``, waited for at most ``put_timeout`` seconds (see the module).

        An exporter with ``put_pending`` writes a large blob's body while this thread
        computes its digest (SHA-256 and file writes release the GIL); any other, or a small
        blob (whose digest takes microseconds: not worth a second fsync), gets the whole blob.
        """
        write = _Write(key)
        put_pending = getattr(self.exporter, "put_pending", None)
        if self.put_timeout is None or put_pending is None or blob.size < PARALLEL_DIGEST_BYTES:
            blob.finish()
            data = bytes(blob)
            put: Callable[[], str] = functools.partial(self.exporter.put, key, data)
        else:
            put = functools.partial(put_pending, key, blob)
        if self.put_timeout is None:
            write.run(put)  # as long as it takes, in the caller's thread
            return write.result()
        with self._writes_lock:
            # a forked child holds none of its parent's writes: no thread of its own would end them
            pid = os.getpid()
            self._hung = {hung for hung in self._hung if not hung.done.is_set() and hung.pid == pid}
            if self._hung:
                oldest = min(self._hung, key=lambda hung: hung.started)
                raise BlobStoreUnavailableError(
                    f"checkpoint {key!r} is not written: the blob store has not finished writing "
                    f"{oldest.key!r} after {time.monotonic() - oldest.started:.0f} s, and no checkpoint "
                    "is written until it does"
                )
        thread = threading.Thread(target=write.run, args=(put,), name="multirun-checkpoint-put", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # at interpreter exit no thread can start: write it here
            blob.finish()
            write.run(put)
        try:
            blob.finish()
        finally:
            blob.abandon()  # if finish failed (an interrupt): the put gives up rather than wait
        if not write.done.wait(self.put_timeout) and write.abandon():
            with self._writes_lock:
                self._hung.add(write)
            raise BlobStoreUnavailableError(
                f"the blob store did not write checkpoint {key!r} within {self.put_timeout:g} s "
                "(checkpoint_timeout): the write goes on in the background, and later checkpoints are "
                "not written until it ends"
            )
        return write.result()

    def _dump(self, document: dict[str, Any], name: str) -> tuple[PendingBlob, int]:
        try:
            return self._dump_blob(document)
        except CheckpointError:
            pass
        # some step result has no form in this serializer: leave those results out (the steps
        # run again after a restore) rather than lose the whole checkpoint; the same for the
        # state of an agent (agent states are kept in every checkpoint, without being asked for)
        document["replay"] = [self._serializable(record) for record in document["replay"]]
        document["agents"] = self._writable_agents(document.get("agents", []))
        try:
            return self._dump_blob(document)
        except CheckpointError as exc:
            raise CheckpointError(f"checkpoint {name!r}: {exc}") from None

    def _dump_blob(self, document: dict[str, Any]) -> tuple[PendingBlob, int]:
        """The blob of ``document``, its digest still to compute (``_put`` does), and the size of
        its payload before compression; with a meta section that ``name_of`` reads without the
        payload, and that is a summary when only the program can deserialize the payload."""
        meta = summary_of(document) if needs_hmac(self._serializer.name) else _named(document)
        payload = self._serializer.dumps(document)
        blob = PendingBlob(
            payload, self._serializer.name, self._serializer.hmac_key, compression=self.compression, meta=meta
        )
        return blob, len(payload)

    def _check_size(self, name: str, run_id: str, size: int, payload_size: int) -> None:
        """Refuse to write a checkpoint that ``load`` would refuse as over ``max_blob_bytes``."""
        limit = self.max_blob_bytes
        if size <= limit and payload_size <= limit:
            return
        what = f"{size} bytes" if size > limit else f"{size} bytes, {payload_size} once decompressed"
        raise CheckpointError(
            f"checkpoint {name!r} of run {run_id} is not written: it is {what}, over the {limit}-byte "
            f"limit, so it could not be read back; raise the limit ({MAX_BYTES_SETTINGS}), or keep "
            "less in the run's state and step results"
        )

    def _serializable(self, record: dict[str, Any]) -> dict[str, Any]:
        if "result" in record:
            try:
                self._serializer.dumps(record["result"])
            except CheckpointError as exc:
                record = {k: v for k, v in record.items() if k != "result"}
                self._warn_unwritable_result(str(record["name"]), exc)
        if "run" in record:  # a sub-run's: its state (or its agents') may hold what cannot be written
            try:
                self._serializer.dumps(record["run"])
            except CheckpointError:
                kept = dict(record["run"])
                try:
                    self._serializer.dumps(kept.get("state"))
                except CheckpointError:
                    del kept["state"]
                    _logger.warning(
                        "multirun: the state of sub-run %r has no %s form: it is left out of the checkpoint",
                        record["name"].removeprefix(RUN_PREFIX),
                        self._serializer.name,
                    )
                if isinstance(kept.get("agents"), list):
                    kept["agents"] = self._writable_agents(kept["agents"])
                record = {**record, "run": kept}
        return record

    def _writable_agents(self, agents: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The agent states this serializer can write; a warning for each one left out."""
        kept = []
        for entry in agents:
            try:
                self._serializer.dumps(entry["state"])
            except CheckpointError as exc:
                _logger.warning(
                    "multirun: the state of agent %r is left out of the checkpoint, so it does not "
                    "come back after a restore: %s",
                    entry["name"],
                    exc,
                )
                continue
            kept.append(entry)
        return kept

    def _warn_unhashed(self, step_names: set[str]) -> None:
        """Once per step name: a step whose calls had no input hash is not served after a restore."""
        new = sorted(step_names - self._unhashed_steps)  # one C-level operation: threads may add names
        if not new:
            return
        self._unhashed_steps.update(new)
        _logger.warning(
            "multirun: steps %s are not served after a restore, so they run (and are paid for) "
            "again: an argument has no JSON form to hash (an object such as a client, or an "
            "iterator, which multirun never reads; pass plain values, a list rather than an "
            "iterator, or make the step a method, whose self is hashed as its class)",
            ", ".join(map(repr, new)),
        )

    def _warn_unwritable_result(self, step_name: str, error: CheckpointError) -> None:
        if step_name in self._unwritable_steps:
            return
        self._unwritable_steps.add(step_name)
        _logger.warning(
            "multirun: the result of step %r is left out of checkpoints, so after a restore the step "
            "runs (and is paid for) again: %s (logged once per step name)",
            step_name,
            error,
        )

    def find(self, checkpoint_id: str) -> str:
        """The key of checkpoint ``checkpoint_id``; CheckpointError if there is none."""
        validate_id(checkpoint_id, "checkpoint id")
        suffix = f"/{checkpoint_id}.ckpt"
        for key in self.list():
            if key.endswith(suffix):
                return key
        raise CheckpointError(f"no checkpoint {checkpoint_id!r} in the store")

    def load(self, checkpoint_id: str) -> RestoredCheckpoint:
        """Read, verify and deserialize a checkpoint."""
        key, blob = self._get(checkpoint_id)
        return self._restored(checkpoint_id, key, blob)

    def describe(self, checkpoint_id: str) -> CheckpointSummary:
        """Read and verify a checkpoint, and say what it holds.

        A checkpoint whose blob has a summary (``summary_of``) is verified whole (size,
        HMAC, digests) but not deserialized; any other is loaded as ``load`` does. A verified
        pickle without a summary whose classes this process does not have (defined in the
        ``__main__`` of the program that wrote it) is not an error: its summary says why its
        contents were not read (``unread``).
        """
        key, blob = self._get(checkpoint_id)
        header, meta = self._verified(open_meta, checkpoint_id, key, blob)
        if meta is None or not needs_hmac(header["serializer"]):  # JSON is read, and checked, whole
            try:
                summary = CheckpointSummary.of(self._restored(checkpoint_id, key, blob))
            except CheckpointError as exc:
                cause = exc.__cause__  # a class or module unpickling looked for and did not find
                if not needs_hmac(header["serializer"]) or not isinstance(
                    cause, (AttributeError, ImportError)
                ):
                    raise
                summary = _unread_summary(checkpoint_id, key, len(blob), header, cause)
        else:
            try:
                summary = _summary_from_meta(meta, header, key, len(blob))
            except (ValueError, KeyError, TypeError, OverflowError) as exc:
                raise CheckpointError(
                    f"checkpoint {checkpoint_id!r} ({key}) is refused: its summary is damaged: {exc}"
                ) from None
        summary.version, summary.compression = header["version"], header["compression"]
        if "hmac" not in header:
            summary.signature = "unsigned"
        elif self._hmac_key is None:  # a signed JSON blob, read without a key: its digest only
            summary.signature = "signed: HMAC not checked (no key set)"
        else:
            summary.signature = "signed: HMAC verified"
        return summary

    def name_of(self, key: str) -> str | None:
        """The name of the checkpoint stored under ``key``, from its blob's meta section, read
        from the start of the blob: its payload is neither read nor checked. None for a blob
        without a meta section (format version 3 and before) or with one over
        ``MAX_PEEKED_META_BYTES``, or when the exporter cannot read a blob's start (no
        ``read_start``: a listing does not fetch whole blobs);
        CheckpointError if it cannot be read."""
        read_start = getattr(self.exporter, "read_start", None)
        if read_start is None:
            return None

        def start(size: int) -> bytes:
            with suppress_instrumentation():
                return bytes(read_start(key, size))

        try:
            meta = peek_meta(start, max_bytes=self.max_blob_bytes, hmac_key=self._hmac_key)
            if meta is None:
                return None
            name = _json_object(meta, "checkpoint", required=True).get("name", "")
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {key} has a damaged meta section: {exc}") from None
        return name if isinstance(name, str) else None

    def _get(self, checkpoint_id: str) -> tuple[str, bytes]:
        """The key and the blob of a checkpoint (refused unread if it is over ``max_blob_bytes``)."""
        key = self.find(checkpoint_id)
        size_of = getattr(self.exporter, "size", None)
        try:
            with suppress_instrumentation():
                size = size_of(key) if size_of is not None else None
                if size is not None and size > self.max_blob_bytes:  # refused before it is read
                    raise CheckpointError(
                        f"checkpoint {checkpoint_id!r} ({key}) is {size} bytes, over the "
                        f"{self.max_blob_bytes}-byte limit; raise the limit ({MAX_BYTES_SETTINGS}) "
                        "if the checkpoint is trusted"
                    )
                blob = self.exporter.get(key)
        except BlobNotFoundError as exc:
            raise CheckpointError(str(exc)) from None
        return key, blob

    def _verified(
        self, reader: Callable[..., tuple[dict[str, Any], Any]], checkpoint_id: str, key: str, blob: bytes
    ) -> tuple[dict[str, Any], Any]:
        """``reader(blob)`` (``open_meta`` or ``load_blob``) with this store's size limit, key
        and serializers; a refusal names the checkpoint and its key."""
        try:
            return reader(
                blob,
                max_bytes=self.max_blob_bytes,
                hmac_key=self._hmac_key,
                allowed_serializers=self._allowed,
            )
        except CheckpointError as exc:
            _say_which(exc, checkpoint_id, key)
            raise

    def _restored(self, checkpoint_id: str, key: str, blob: bytes) -> RestoredCheckpoint:
        """Verify and deserialize the blob of a checkpoint."""
        header, document = self._verified(load_blob, checkpoint_id, key, blob)
        try:
            if not isinstance(document, dict):
                raise TypeError(f"it holds a {type(document).__name__}, not a JSON object")
            meta = _json_object(document, "checkpoint", required=True)
            checkpoint = _checkpoint_of(meta, header, len(blob), state_data=blob)
            recorded = document.get("replay", [])
            if not isinstance(recorded, list):
                raise TypeError(f"its replay log is a {type(recorded).__name__}, not a list")
            if header["version"] == 1:  # a cache of [name, input hash, result] triples then
                recorded = records_from_v1(recorded)
            check_records(recorded)
            replay = [dict(record) for record in recorded]
            ledger = {k: int(v) for k, v in _json_object(document, "ledger").items()}
            state = dict(_json_object(document, "state"))
            trace = {k: str(v) for k, v in _json_object(document, "trace").items()}
            sub_run_id = str(meta.get("sub_run_id", ""))
            seq = meta.get("sub_run_seq")
            sub_run_seq = None if seq is None else int(seq)
            agents = _agent_states(document.get("agents"), state)
        except (ValueError, KeyError, TypeError, OverflowError) as exc:  # Overflow: int(Infinity)
            raise ReplayError(f"checkpoint {checkpoint_id!r} cannot be replayed: {exc}") from None
        return RestoredCheckpoint(
            checkpoint, state, replay, ledger, key, trace, sub_run_id, sub_run_seq, agents
        )

    def latest(self, run_id: str) -> str:
        """The id of the newest checkpoint of ``run_id``; CheckpointError if it has none."""
        found = [parsed for parsed in map(parse_checkpoint_key, self.list(run_id)) if parsed is not None]
        if not found:
            raise CheckpointError(f"run {run_id!r} has no checkpoint in the store")
        return max(found).checkpoint_id  # ids sort by creation; stray files are not checkpoints

    def list(self, run_id: str | None = None) -> list[str]:
        """Keys of the stored checkpoints, of one run or all."""
        prefix = "checkpoints/" if run_id is None else f"checkpoints/{validate_id(run_id, 'run id')}/"
        with suppress_instrumentation():
            return self.exporter.list(prefix)


def _say_which(error: CheckpointError, checkpoint_id: str, key: str) -> None:
    """Make ``error`` say which checkpoint it is about."""
    error.args = (f"checkpoint {checkpoint_id!r} ({key}) is refused: {error}", *error.args[1:])


def _json_list(document: dict[str, Any], part: str) -> list[Any]:
    """``document[part]``, a JSON list (empty when it is left out); a TypeError naming it if not."""
    value = document.get(part, [])
    if not isinstance(value, list):
        raise TypeError(f"its {part} is a {type(value).__name__}, not a list")
    return value


def _json_object(document: dict[str, Any], part: str, *, required: bool = False) -> dict[str, Any]:
    """``document[part]``, a JSON object (empty when it is left out and not ``required``); a
    TypeError naming it if it is something else, ValueError if it is required and left out."""
    if required and part not in document:
        raise ValueError(f"it has no {part!r} object")
    value = document.get(part, {})
    if not isinstance(value, dict):
        raise TypeError(f"its {part} is a {type(value).__name__}, not a JSON object")
    return value


def _agent_states(agents: Any, state: dict[str, Any]) -> list[dict[str, Any]]:
    """A checkpoint's agent states, checked; a checkpoint written before they were kept has
    only those of ``AgentContext.checkpoint``, in the run's state as ``agent:<name>``."""
    if agents is None:
        return [
            {"name": key.removeprefix("agent:"), "occurrence": 1, "state": value}
            for key, value in state.items()
            if key.startswith("agent:") and isinstance(value, dict)
        ]
    if not isinstance(agents, list):
        raise TypeError(f"agents is a {type(agents).__name__}, not a list")
    checked = []
    for entry in agents:
        found = agent_state(entry)
        if found is None:
            raise ValueError(f"malformed agent state {str(entry)[:80]!r}")
        name, occurrence, state = found
        checked.append({"name": name, "occurrence": occurrence, "state": state})
    return checked


def agent_state(entry: Any) -> tuple[str, int, dict[str, Any]] | None:
    """The name, occurrence and state of an agent's entry in a checkpoint's agent states
    (``RunContext.agent_states``), or None if it is not such an entry."""
    if not isinstance(entry, dict):
        return None
    name, occurrence, state = entry.get("name"), entry.get("occurrence"), entry.get("state")
    if not isinstance(name, str) or type(occurrence) is not int or not isinstance(state, dict):
        return None
    return name, occurrence, state


class _Write:
    """One ``put`` running in a thread of its own; it says when it ends after it was given up on."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.started = time.monotonic()
        self.pid = os.getpid()  # the process whose thread writes it
        self.done = threading.Event()
        self.uri: str | None = None
        self.error: BaseException | None = None
        self._abandoned = False
        self._lock = threading.Lock()

    def run(self, put: Callable[[], str]) -> None:
        try:
            with suppress_instrumentation():  # the store's own HTTP calls are not part of the trace
                self.uri = put()
        except BaseException as exc:
            self.error = exc
        finally:
            with self._lock:
                self.done.set()
                abandoned = self._abandoned
        if abandoned:
            took = time.monotonic() - self.started
            if self.error is None:
                _logger.warning(
                    "multirun: the blob store wrote checkpoint %r after all, %.0f s after it began; "
                    "checkpoints are written again",
                    self.key,
                    took,
                )
            else:
                _logger.warning(
                    "multirun: writing checkpoint %r failed after %.0f s: %s; checkpoints are written again",
                    self.key,
                    took,
                    self.error,
                )

    def result(self) -> str:
        """The blob's URI once the put ended; what the put raised, if it raised."""
        if self.error is not None:
            raise self.error
        assert self.uri is not None
        return self.uri

    def abandon(self) -> bool:
        """Stop waiting for it: True if it is still running (it logs when it ends)."""
        with self._lock:
            if self.done.is_set():
                return False
            self._abandoned = True
            return True


def _trace_of(run: RunContext) -> dict[str, str]:
    context = run.span.get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


def _environment() -> dict[str, Any]:
    return {"python": sys.version.split()[0], "platform": platform.platform(), "pid": os.getpid()}
