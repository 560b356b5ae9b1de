"""The checkpoint blob format: a small verified header, then the payload.

    MRCK1\\n
    {"serializer": "json", "size": 1234, "digest": "sha256:..."}\\n
    <payload: ``size`` bytes>

The header is read first and the payload's size and digest are checked
before a single byte of it is deserialized, so a truncated, bit-flipped or
padded blob is refused with CheckpointError.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from multirun.errors import CheckpointError

MAGIC = b"MRCK1\n"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 4096


def seal(payload: bytes, serializer: str) -> tuple[bytes, str]:
    """The blob for ``payload`` and its digest (``sha256:<hex>``)."""
    digest = "sha256:" + hashlib.sha256(payload).hexdigest()
    header = {"version": FORMAT_VERSION, "serializer": serializer, "size": len(payload), "digest": digest}
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("ascii")
    return MAGIC + head + b"\n" + payload, digest


def open_blob(blob: bytes, *, max_bytes: int) -> tuple[dict[str, Any], bytes]:
    """The header and the verified payload of ``blob``; CheckpointError if anything is off."""
    if len(blob) > max_bytes:
        raise CheckpointError(f"checkpoint blob is {len(blob)} bytes, over the {max_bytes} limit")
    if not blob.startswith(MAGIC):
        raise CheckpointError("not a multirun checkpoint (bad magic bytes)")
    end = blob.find(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER_BYTES)
    if end < 0:
        raise CheckpointError("checkpoint header is missing or too long")
    try:
        header = json.loads(blob[len(MAGIC) : end])
        size = int(header["size"])
        digest = str(header["digest"])
        version = int(header["version"])
        str(header["serializer"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint header is damaged: {exc}") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint format version {version} is newer than this multirun reads "
            f"({FORMAT_VERSION}); upgrade multirun-otel"
        )
    payload = blob[end + 1 :]
    if len(payload) != size:
        raise CheckpointError(
            f"checkpoint is truncated or padded: payload is {len(payload)} bytes, header says {size}"
        )
    actual = "sha256:" + hashlib.sha256(payload).hexdigest()
    if actual != digest:
        raise CheckpointError("checkpoint digest does not match: the blob was altered or damaged")
    return header, payload
