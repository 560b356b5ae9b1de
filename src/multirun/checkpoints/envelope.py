"""The checkpoint blob format: a small verified header, an optional meta section, then the payload.

    MRCK1\\n
    <header: one line of JSON>\\n
    <meta: ``meta_size`` bytes of JSON, version 4 only>
    <payload: ``size`` bytes>

for example (the header wrapped here, one line in a blob)::

    {"compression":"none","digest":"sha256:<64 hex>","hmac":"<64 hex>",
     "meta_digest":"sha256:<64 hex>","meta_size":321,"serializer":"pickle",
     "size":1234,"version":4}

The header is one line of ASCII JSON (compact, keys sorted, at most 4096
bytes). Its fields:

- ``version``: the format version, 3 or 4. A blob is written as version 4
  when it has a meta section, else as version 3, which earlier releases read
  too. Versions 1 (multirun-otel 0.1.0) and 2 are still read: version 1 has
  no ``compression`` and no ``hmac``; version 2 signs the payload itself (see
  below).
- ``serializer``: the name of the serializer that made the payload
  (``json``, ``pickle``, ``cloudpickle``; see ``serializers``).
- ``size``: the payload's length in bytes, as stored (after compression).
- ``digest``: ``sha256:`` and the hex SHA-256 of the stored payload.
- ``compression``: ``none`` or ``zlib``.
- ``meta_size`` and ``meta_digest`` (version 4): the length and the
  ``sha256:`` digest of the meta section, a JSON object in ASCII that says
  what the payload holds, for readers that must not deserialize it (the
  command line cannot unpickle classes of the program that wrote it).
- ``hmac`` (optional): hex HMAC-SHA256, with the checkpoint key, of
  ``MRCK/v3/<serializer>/<compression>/<size>/<digest>\\n``, to which
  version 4 adds ``/<meta_size>/<meta_digest>`` before the newline. The MAC
  binds how the payload will be decoded (so a signed payload cannot be
  relabelled as another serializer) and the payload's digest, which binds
  the payload (and the meta section's, which binds the meta section): one
  SHA-256 pass over the payload serves both the digest and the MAC.
  Version 2 signed ``MRCK/v2/<serializer>/<compression>\\n`` followed by the
  stored payload, a second pass.

``open_blob`` checks everything before it returns a single payload byte, so
nothing is ever deserialized unless it passed: the blob's size against
``max_bytes`` (before reading the payload), the magic bytes, the header, that
the reader allows the serializer, that a serializer that can run code
(anything but ``json``) has an HMAC and the reader a key, the payload's
size, the HMAC (constant-time; version 3 before the payload is hashed,
version 2 after the digest), the meta section's digest, the digest, and,
last, a decompression bounded by ``max_bytes``. Any failure raises
CheckpointError saying what to do. ``open_meta`` checks the same and returns
the meta section instead of the payload. ``peek_meta`` reads the meta section
from the start of a blob alone, for a listing: it checks the header, the meta
section's digest and, with a key, the header's HMAC, never the payload.

A JSON blob that carries an HMAC has it checked whenever the reader has a
key; a reader without one checks its digest only. Unsigned JSON is accepted
by every reader, since JSON cannot run code: the HMAC protects a JSON blob
against being altered, not against its ``hmac`` being removed.

``decode_blob`` does the same and decodes the payload, with one difference
for a large uncompressed JSON payload (except a version 2 one read with a
key, whose HMAC needs the payload): it is decoded while its digest is
computed on another thread (SHA-256 releases the GIL, JSON decoding runs no
code), and the value is returned only if the digest matched.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import re
import threading
import zlib
from collections.abc import Callable, Collection, Mapping
from typing import Any, BinaryIO, Literal, TypeVar

from multirun.errors import CheckpointError, ConfigurationError

MAGIC = b"MRCK1\n"
#: The newest format version, written for a blob with a meta section; one without is written as
#: version 3, which earlier releases read too.
FORMAT_VERSION = 4
_VERSION_WITHOUT_META = 3
MAX_HEADER_BYTES = 4096
HMAC_KEY_ENV = "MULTIRUN_CHECKPOINT_HMAC_KEY"
MAX_BYTES_ENV = "MULTIRUN_CHECKPOINT_MAX_BYTES"
#: Where the size limit of a checkpoint is set, for messages: the environment, ``init``, or the
#: low-level API.
MAX_BYTES_SETTINGS = (
    f"{MAX_BYTES_ENV} or multirun.init(checkpoint_max_bytes=...); max_blob_bytes=... for a "
    "CheckpointStore built directly, max_bytes=... for the envelope functions"
)
#: Where the HMAC key is set, for messages: the environment, ``init``, or the low-level API.
HMAC_KEY_SETTINGS = (
    f"{HMAC_KEY_ENV} or multirun.init(checkpoint_hmac_key=...); "
    "hmac_key=... for a CheckpointStore or serializer built directly"
)
#: Where the serializers a reader accepts are set, for messages: a store reads the one it writes.
SERIALIZER_SETTINGS = (
    "MULTIRUN_CHECKPOINT_SERIALIZER or multirun.init(checkpoint_serializer=...); read_serializers=... "
    "for a CheckpointStore built directly, allowed_serializers=... for the envelope functions"
)

#: Serializers whose decoding cannot run code. Every other one needs a verified HMAC.
SAFE_SERIALIZERS = frozenset({"json"})
#: What a reader accepts unless configured otherwise.
DEFAULT_ALLOWED_SERIALIZERS: tuple[str, ...] = ("json",)

Compression = Literal["none", "zlib"]
COMPRESSIONS: tuple[Compression, ...] = ("none", "zlib")

_REQUIRED = {
    1: frozenset({"version", "serializer", "size", "digest"}),
    2: frozenset({"version", "serializer", "size", "digest", "compression"}),
    3: frozenset({"version", "serializer", "size", "digest", "compression"}),
    4: frozenset({"version", "serializer", "size", "digest", "compression", "meta_size", "meta_digest"}),
}
_OPTIONAL = {1: frozenset[str](), 2: frozenset({"hmac"}), 3: frozenset({"hmac"}), 4: frozenset({"hmac"})}
#: From this payload size on, ``decode_blob`` decodes JSON while another thread computes the digest,
#: and a checkpoint store writes a blob while it computes the digest (below it, the thread or the
#: second fsync costs more than it saves).
PARALLEL_DIGEST_BYTES = 1 << 20
_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,63}\Z")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}\Z")
_HEX_MAC = re.compile(r"[0-9a-f]{64}\Z")

Blob = bytes | bytearray | memoryview
#: A payload as read: bytes, or a view into an immutable ``bytes`` blob (no copy of a large payload).
Payload = bytes | memoryview
T = TypeVar("T")


def needs_hmac(serializer: str) -> bool:
    """Whether blobs of ``serializer`` must carry a verified HMAC (anything but JSON can run code)."""
    return serializer not in SAFE_SERIALIZERS


def seal(
    payload: bytes,
    serializer: str,
    hmac_key: bytes | None = None,
    *,
    compression: Compression = "none",
    meta: Mapping[str, Any] | None = None,
) -> tuple[bytes, str]:
    """The blob for ``payload`` and its digest (``sha256:<hex>`` of the stored payload).

    With ``hmac_key`` the header gets an ``hmac``; a serializer other than
    ``json`` cannot be sealed without one (ConfigurationError). With ``meta``
    (plain JSON data) the blob has a meta section, and is version 4.
    """
    blob = PendingBlob(payload, serializer, hmac_key, compression=compression, meta=meta)
    digest = blob.finish()
    return bytes(blob), digest


class PendingBlob:
    """A blob whose body (meta section, then payload) is known before its header is.

    The header's length does not depend on the digest and HMAC it holds (both are
    fixed-width hex), so ``head_size`` is known at once: a store can write the body
    at that offset while ``finish`` computes the digest in another thread, and then
    the header (``head`` waits for it). ``seal`` is ``finish`` then ``bytes()``.
    """

    def __init__(
        self,
        payload: bytes,
        serializer: str,
        hmac_key: bytes | None = None,
        *,
        compression: Compression = "none",
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        if not _NAME.match(serializer):
            raise ConfigurationError(
                f"invalid serializer name {serializer!r}: use lowercase letters and digits"
            )
        if needs_hmac(serializer) and not hmac_key:
            raise ConfigurationError(
                f"serializer {serializer!r} can run code when a checkpoint is loaded, so its checkpoints "
                f"must be signed: set an HMAC key ({HMAC_KEY_SETTINGS})"
            )
        if compression == "zlib":
            stored = zlib.compress(payload, 6)
        elif compression == "none":
            stored = bytes(payload)  # no copy of bytes; a bytearray could change meanwhile
        else:
            raise ConfigurationError(
                f"invalid compression {compression!r}: use one of {', '.join(COMPRESSIONS)}"
            )
        self._header: dict[str, Any] = {
            "version": _VERSION_WITHOUT_META,
            "serializer": serializer,
            "size": len(stored),
            "digest": _PLACEHOLDER_DIGEST,
            "compression": compression,
        }
        meta_section = b""
        if meta is not None:
            meta_section = _encode_meta(meta)
            self._header.update(
                version=FORMAT_VERSION, meta_size=len(meta_section), meta_digest=_digest(meta_section)
            )
        self._hmac_key = hmac_key
        if hmac_key:
            self._header["hmac"] = _PLACEHOLDER_MAC
        self.body = (meta_section, stored)
        self.head_size = len(_encode_head(self._header))
        self.size = self.head_size + len(meta_section) + len(stored)
        self._head = b""
        self._ready = threading.Event()
        self.digest = ""  # the payload's, once finished

    def finish(self) -> str:
        """Compute the payload's digest and the header (once); the digest."""
        if self._head:
            return self.digest
        header = self._header
        header["digest"] = self.digest = _digest(self.body[1])
        if self._hmac_key:
            header["hmac"] = _header_mac(self._hmac_key, header)
        head = _encode_head(header)
        assert len(head) == self.head_size, "the header's length changed with its digest"
        self._head = head
        self._ready.set()
        return self.digest

    def abandon(self) -> None:
        """Give up before ``finish``: ``head`` then raises (a no-op once finished)."""
        self._ready.set()

    def head(self) -> bytes:
        """The magic bytes and the header line, once ``finish`` made them (it waits till then)."""
        self._ready.wait()
        if not self._head:
            raise CheckpointError("checkpoint not written: its digest was not computed")
        return self._head

    def __bytes__(self) -> bytes:
        return b"".join((self.head(), *self.body))


_PLACEHOLDER_DIGEST = "sha256:" + "0" * 64
_PLACEHOLDER_MAC = "0" * 64


def _encode_head(header: dict[str, Any]) -> bytes:
    return MAGIC + json.dumps(header, separators=(",", ":"), sort_keys=True).encode("ascii") + b"\n"


def _encode_meta(meta: Mapping[str, Any]) -> bytes:
    try:
        # ASCII: a lone surrogate in a state key is escaped, and reads back as it was
        text = json.dumps(dict(meta), separators=(",", ":"), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint meta section is not plain JSON data: {exc}") from None
    return text.encode("ascii")


def open_blob(
    blob: Blob | BinaryIO,
    *,
    max_bytes: int,
    hmac_key: bytes | None = None,
    allowed_serializers: Collection[str] = DEFAULT_ALLOWED_SERIALIZERS,
) -> tuple[dict[str, Any], bytes]:
    """The header and the verified (and decompressed) payload of ``blob``.

    ``blob`` is the blob's bytes or a binary stream positioned at its start;
    a stream is read no further than the header until the declared size is
    known to fit in ``max_bytes``. The header comes back with
    ``compression`` filled in for version 1. Anything off raises
    CheckpointError, and then no payload byte was returned.
    """
    header, _, stored = _read_checked(blob, max_bytes, hmac_key, allowed_serializers)
    _check_payload(header, stored, hmac_key)
    return header, bytes(_unpacked(header, stored, max_bytes))


def open_meta(
    blob: Blob | BinaryIO,
    *,
    max_bytes: int,
    hmac_key: bytes | None = None,
    allowed_serializers: Collection[str] = DEFAULT_ALLOWED_SERIALIZERS,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The header and the meta section of ``blob`` (None before version 4).

    The whole blob is checked as ``open_blob`` checks it, the payload's digest and
    decompression included, and no payload byte is deserialized.
    """
    header, meta, stored = _read_checked(blob, max_bytes, hmac_key, allowed_serializers)
    _check_payload(header, stored, hmac_key)
    _unpacked(header, stored, max_bytes)  # a payload that does not decompress is refused here too
    return header, meta


MAX_PEEKED_META_BYTES = 8 << 20
"""The largest meta section ``peek_meta`` reads (a listing reads one per checkpoint): a header
can declare one of up to ``max_bytes``, and a listing of such blobs read them whole."""


def peek_meta(
    read_start: Callable[[int], bytes],
    *,
    max_bytes: int,
    hmac_key: bytes | None = None,
    max_meta_bytes: int = MAX_PEEKED_META_BYTES,
) -> dict[str, Any] | None:
    """The meta section of a blob, read from its start alone: ``read_start(n)`` gives the
    blob's first ``n`` bytes (fewer if it is shorter). None before version 4, and for a meta
    section over ``max_meta_bytes``, which is not read.

    The header and the meta section's digest are checked, and with ``hmac_key`` the HMAC of a
    signed header (which covers the meta section's digest); the payload is neither read nor
    checked. For a listing, which must not read every blob whole: ``open_meta`` checks the blob.
    """
    first = read_start(len(MAGIC) + MAX_HEADER_BYTES + 1)
    header, start = _read_header(first)
    if "meta_size" not in header or header["meta_size"] > max_meta_bytes:
        return None
    end = start + header["meta_size"]
    _check_fits(header, start, max_bytes)
    if hmac_key is not None and "hmac" in header:
        _check_mac(_header_mac(hmac_key, header), header)  # version 4: no payload pass needed
    head = first if len(first) >= end else read_start(end)
    if len(head) < end:
        raise CheckpointError(f"checkpoint is truncated: it ends inside its meta section ({len(head)} bytes)")
    return _read_meta(header, memoryview(head)[start:end])


def decode_blob(
    blob: Blob | BinaryIO,
    decode: Callable[[dict[str, Any], Payload], T],
    *,
    max_bytes: int,
    hmac_key: bytes | None = None,
    allowed_serializers: Collection[str] = DEFAULT_ALLOWED_SERIALIZERS,
) -> tuple[dict[str, Any], T]:
    """``open_blob``, then ``decode(header, payload)``: the header and the decoded value.

    A large uncompressed payload of a serializer that cannot run code (JSON)
    is decoded while another thread computes its digest; the value comes
    back only if the digest matched, and a damaged blob raises the digest's
    CheckpointError even when decoding failed first. ``decode`` may be given a
    view into ``blob`` rather than a copy: it should not keep it.
    """
    header, _, stored = _read_checked(blob, max_bytes, hmac_key, allowed_serializers)
    if (
        header["serializer"] in SAFE_SERIALIZERS
        and header["compression"] == "none"
        and len(stored) >= PARALLEL_DIGEST_BYTES
        and not _mac_covers_payload(header, hmac_key)
    ):
        return header, _decode_while_digesting(header, stored, decode)
    _check_payload(header, stored, hmac_key)
    return header, decode(header, _unpacked(header, stored, max_bytes))


def _read_checked(
    blob: Blob | BinaryIO, max_bytes: int, hmac_key: bytes | None, allowed: Collection[str]
) -> tuple[dict[str, Any], dict[str, Any] | None, Payload]:
    """The header, the meta section (None before version 4) and the stored payload, with
    everything but the payload's own passes checked."""
    if isinstance(blob, (bytes, bytearray, memoryview)):
        view = memoryview(blob).cast("B")
        if view.nbytes > max_bytes:
            raise CheckpointError(
                f"checkpoint blob is {view.nbytes} bytes, over the {max_bytes}-byte limit; "
                f"raise the limit ({MAX_BYTES_SETTINGS}) if the checkpoint is trusted"
            )
        header, start = _read_header(bytes(view[: len(MAGIC) + MAX_HEADER_BYTES + 1]))
        _check_policy(header, hmac_key, allowed)
        _check_fits(header, start, max_bytes)
        # a view into bytes, which nobody can change meanwhile; anything else (a subclass can
        # export a writable buffer) is copied
        body: Payload = view[start:] if type(blob) is bytes else bytes(view[start:])
    else:
        head = _read_up_to(blob, len(MAGIC) + MAX_HEADER_BYTES + 1)
        header, start = _read_header(head)
        _check_policy(header, hmac_key, allowed)
        _check_fits(header, start, max_bytes)
        # one byte more than declared, to notice padding
        body = head[start:] + _read_up_to(blob, max(0, _body_size(header) - (len(head) - start)) + 1)
    if len(body) != _body_size(header):
        what = "meta section and payload are" if "meta_size" in header else "payload is"
        raise CheckpointError(
            f"checkpoint is truncated or padded: {what} {len(body)} bytes, header says {_body_size(header)}"
        )
    if hmac_key is not None and "hmac" in header and not _mac_covers_payload(header, hmac_key):
        _check_mac(_header_mac(hmac_key, header), header)
    meta_size = header.get("meta_size", 0)
    meta = _read_meta(header, body[:meta_size]) if "meta_size" in header else None
    return header, meta, body[meta_size:]


def _body_size(header: dict[str, Any]) -> int:
    """How many bytes follow the header: the meta section's and the payload's."""
    size: int = header.get("meta_size", 0) + header["size"]
    return size


def _read_meta(header: dict[str, Any], section: Payload) -> dict[str, Any]:
    """The meta section as a JSON object, once its digest matched."""
    _check_digest(_digest(section), header, "meta_digest")
    try:
        meta = json.loads(bytes(section).decode("ascii"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError too; nested too deeply
        raise CheckpointError(f"checkpoint meta section is damaged: {exc}") from None
    if not isinstance(meta, dict):
        raise CheckpointError("checkpoint meta section is damaged: not a JSON object")
    return meta


def _check_payload(header: dict[str, Any], stored: Payload, hmac_key: bytes | None) -> None:
    """The digest, and a version 2 HMAC (which covers the payload itself)."""
    _check_digest(_digest(stored), header)
    if hmac_key is not None and _mac_covers_payload(header, hmac_key):
        _check_mac(_payload_mac(hmac_key, header, stored), header)


def _mac_covers_payload(header: dict[str, Any], hmac_key: bytes | None) -> bool:
    """Whether this reader must check a version 2 HMAC, which needs a pass over the payload."""
    return hmac_key is not None and "hmac" in header and header["version"] < 3


def _check_digest(digest: str, header: dict[str, Any], field: str = "digest") -> None:
    if not hmac.compare_digest(digest, header[field]):
        what = "meta section digest" if field == "meta_digest" else "digest"
        raise CheckpointError(f"checkpoint {what} does not match: the blob was altered or damaged")


def _check_mac(mac: str, header: dict[str, Any]) -> None:
    if not hmac.compare_digest(mac, header["hmac"]):
        raise CheckpointError(
            "checkpoint HMAC does not match: the blob was altered, or it was signed with another key "
            f"than the one configured ({HMAC_KEY_SETTINGS})"
        )


def _decode_while_digesting(
    header: dict[str, Any], stored: Payload, decode: Callable[[dict[str, Any], Payload], T]
) -> T:
    digests: list[str] = []

    def digest_payload() -> None:
        with contextlib.suppress(Exception):  # if it fails, the digest is computed again below
            digests.append(_digest(stored))

    worker = threading.Thread(target=digest_payload, name="multirun-checkpoint-digest", daemon=True)
    try:
        worker.start()
    except RuntimeError:  # no new threads, e.g. at interpreter shutdown: one after the other
        _check_digest(_digest(stored), header)
        return decode(header, stored)
    # On a KeyboardInterrupt this returns at once; the daemon thread ends when its hash does.
    try:
        value = decode(header, stored)
    except Exception as exc:
        failure: Exception | None = exc
    else:
        failure = None
    worker.join()
    # a damaged blob is reported as damaged, whatever decoding made of it
    _check_digest(digests[0] if digests else _digest(stored), header)
    if failure is not None:
        raise failure
    return value


def _unpacked(header: dict[str, Any], stored: Payload, max_bytes: int) -> Payload:
    return _inflate(stored, max_bytes) if header["compression"] == "zlib" else stored


def _read_up_to(stream: BinaryIO, size: int) -> bytes:
    """``size`` bytes from ``stream``, or fewer at its end (short reads are read on)."""
    chunks: list[bytes] = []
    left = size
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_header(head: bytes) -> tuple[dict[str, Any], int]:
    """The validated header in the first bytes of a blob, and where its payload starts."""
    if not head:
        raise CheckpointError("checkpoint blob is empty")
    if not head.startswith(MAGIC):
        if MAGIC.startswith(head):
            raise CheckpointError("checkpoint blob is truncated: it ends inside the magic bytes")
        raise CheckpointError("not a multirun checkpoint (bad magic bytes)")
    end = head.find(b"\n", len(MAGIC))
    if end < 0:
        raise CheckpointError(
            f"checkpoint header is truncated, damaged or longer than {MAX_HEADER_BYTES} bytes"
        )
    try:
        header = json.loads(head[len(MAGIC) : end].decode("ascii"))
    except (ValueError, RecursionError) as exc:  # nested too deeply: a crafted header
        raise CheckpointError(f"checkpoint header is damaged: {exc}") from None
    if not isinstance(header, dict):
        raise CheckpointError("checkpoint header is damaged: not a JSON object")
    version = header.get("version")
    if type(version) is not int:
        raise CheckpointError(f"checkpoint header is damaged: version is {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint format version {version} is newer than this multirun-otel reads "
            f"({FORMAT_VERSION}); upgrade multirun-otel to read it"
        )
    if version not in _REQUIRED:
        raise CheckpointError(f"checkpoint header is damaged: unknown format version {version}")
    keys = set(header)
    missing = _REQUIRED[version] - keys
    unknown = keys - _REQUIRED[version] - _OPTIONAL[version]
    if missing or unknown:
        raise CheckpointError(
            f"checkpoint header is damaged: missing {sorted(missing)}, unexpected {sorted(unknown)}"
        )
    header.setdefault("compression", "none")
    problems = [
        name
        for name, ok in (
            ("serializer", isinstance(header["serializer"], str) and _NAME.match(header["serializer"])),
            ("size", type(header["size"]) is int and header["size"] >= 0),
            ("digest", isinstance(header["digest"], str) and _DIGEST.match(header["digest"])),
            (
                "meta_size",
                "meta_size" not in header or (type(header["meta_size"]) is int and header["meta_size"] >= 0),
            ),
            (
                "meta_digest",
                "meta_digest" not in header
                or (isinstance(header["meta_digest"], str) and _DIGEST.match(header["meta_digest"])),
            ),
            ("compression", header["compression"] in COMPRESSIONS),
            (
                "hmac",
                "hmac" not in header or (isinstance(header["hmac"], str) and _HEX_MAC.match(header["hmac"])),
            ),
        )
        if not ok
    ]
    if problems:
        raise CheckpointError(f"checkpoint header is damaged: invalid {', '.join(problems)}")
    return header, end + 1


def _check_policy(header: dict[str, Any], hmac_key: bytes | None, allowed: Collection[str]) -> None:
    """Refuse a serializer the reader does not allow, and unsigned or unverifiable code-running blobs."""
    name = header["serializer"]
    risky = needs_hmac(name)
    if name not in allowed:
        advice = (
            f"it can run code when loaded: to read a checkpoint you trust, allow {name!r} "
            f"({SERIALIZER_SETTINGS}) and set the HMAC key it was signed with ({HMAC_KEY_SETTINGS})"
            if risky
            else f"allow {name!r} to read it ({SERIALIZER_SETTINGS})"
        )
        raise CheckpointError(
            f"checkpoint was written with the {name!r} serializer, which this reader does not allow "
            f"(allowed: {', '.join(sorted(allowed)) or 'none'}); {advice}"
        )
    if not risky:
        return
    if hmac_key is None:
        raise CheckpointError(
            f"checkpoint uses the {name!r} serializer, which can run code when loaded, and no HMAC key "
            f"is configured to verify it: set the key it was signed with ({HMAC_KEY_SETTINGS})"
        )
    if "hmac" not in header:
        raise CheckpointError(
            f"checkpoint uses the {name!r} serializer but carries no HMAC, so it is not loaded: "
            "re-create it with an HMAC key set, or with the json serializer"
        )


def _check_fits(header: dict[str, Any], start: int, max_bytes: int) -> None:
    if start + _body_size(header) > max_bytes:
        raise CheckpointError(
            f"checkpoint blob declares {start + _body_size(header)} bytes, over the {max_bytes}-byte "
            f"limit; raise the limit ({MAX_BYTES_SETTINGS}) if the checkpoint is trusted"
        )


def _digest(data: Payload) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _header_mac(key: bytes, header: dict[str, Any]) -> str:
    """Versions 3 and 4: HMAC-SHA256 over what decides decoding, the payload's size and digest,
    and (version 4) the meta section's."""
    label = (
        f"MRCK/v{header['version']}/{header['serializer']}/{header['compression']}"
        f"/{header['size']}/{header['digest']}"
    )
    if "meta_size" in header:
        label += f"/{header['meta_size']}/{header['meta_digest']}"
    label += "\n"
    return hmac.new(key, label.encode("ascii"), hashlib.sha256).hexdigest()


def _payload_mac(key: bytes, header: dict[str, Any], stored: Payload) -> str:
    """Version 2: HMAC-SHA256 over what decides decoding, then the payload itself."""
    label = f"MRCK/v{header['version']}/{header['serializer']}/{header['compression']}\n"
    mac = hmac.new(key, label.encode("ascii"), hashlib.sha256)
    mac.update(stored)
    return mac.hexdigest()


def _inflate(stored: Payload, max_bytes: int) -> bytes:
    """Decompress a zlib payload, refusing to produce more than ``max_bytes`` (decompression bombs)."""
    limit = max(1, max_bytes)
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(stored, limit)
    except zlib.error as exc:
        raise CheckpointError(f"checkpoint payload does not decompress: {exc}") from None
    if not inflater.eof:
        if inflater.unconsumed_tail or len(data) >= limit:
            raise CheckpointError(
                f"checkpoint payload decompresses to more than the {max_bytes}-byte limit; "
                f"raise the limit ({MAX_BYTES_SETTINGS}) if the checkpoint is trusted"
            )
        raise CheckpointError("checkpoint payload is a truncated zlib stream")
    if inflater.unused_data:
        raise CheckpointError("checkpoint payload has bytes after its zlib stream")
    return data
