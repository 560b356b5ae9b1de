"""Regenerate the golden checkpoint files in this folder.

    .venv/bin/python tests/golden/make_golden.py          # rewrite them
    .venv/bin/python tests/golden/make_golden.py --check  # exit 1 if any would change

The files are committed. ``tests/test_serialization.py`` loads each one and
checks its exact content, so a release that can no longer read checkpoints
written by an earlier one fails the suite. Do not regenerate a file to make
that test pass: a format change gets a new format version and a new golden
file beside the old ones.

- ``checkpoint-v1-json.ckpt``: format version 1, as multirun-otel 0.1.0
  wrote it. Version 1 is no longer written, so the writer below is a frozen
  copy of 0.1.0's ``seal`` and of its store's JSON encoding.
- ``checkpoint-v2-json.ckpt``: format version 2, JSON serializer, no HMAC.
- ``checkpoint-v2-json-zlib.ckpt``: the same, zlib-compressed.
- ``checkpoint-v2-pickle.ckpt``: format version 2, pickle serializer,
  signed with ``TEST_HMAC_KEY`` below. That key is public and only for
  these tests: never use it for real checkpoints. Version 2 is no longer
  written: ``_v2_seal`` is a frozen copy of its ``seal`` (the payloads are
  the serializers' own, unchanged since).
- ``checkpoint-v3-*.ckpt``: format version 3 (the HMAC signs the header's
  size and digest), the same documents: JSON plain, zlib-compressed and
  signed, and pickle signed, with ``TEST_HMAC_KEY``. Version 3 is still
  written, by the live ``dump_blob``, for a blob without a meta section.
- ``checkpoint-v3-pickle-main.ckpt``: format version 3, a checkpoint as
  ``CheckpointStore`` saved one with the pickle serializer before version 4
  (no meta section, so no summary), whose state, agent state and step
  result hold objects of a class of the program's ``__main__`` (``Notes``,
  pickled as ``__main__.Notes``): only that program can unpickle it, and
  ``multirun checkpoints show``/``verify`` show what they can without it.
  Signed with ``TEST_HMAC_KEY``.
- ``checkpoint-v4-pickle.ckpt``: format version 4 (a meta section, whose
  size and digest the HMAC signs too), a checkpoint as ``CheckpointStore``
  saves one with the pickle serializer: the document pickled, its summary
  (``summary_of``) in the meta section, signed with ``TEST_HMAC_KEY``. Version
  4 is the current format, written by the live ``dump_blob``: when version 5
  comes, freeze its writer here as was done for versions 1 and 2.
- ``checkpoint-v4-json.ckpt``: format version 4, a JSON checkpoint as
  ``CheckpointStore`` saves one: its meta section names it (``V4_JSON_META``),
  so ``multirun checkpoints`` lists it by name from the start of the blob.

Every value is fixed (no clock, no pid, sets sorted), so a run rewrites the
same bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys
import zlib
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from multirun.checkpoints.serializers import HMAC_KEY_ENV, dump_blob, get_serializer
from multirun.checkpoints.store import summary_of

GOLDEN_DIR = Path(__file__).resolve().parent

#: Public, test-only key that signs ``checkpoint-v2-pickle.ckpt``. Not a secret.
TEST_HMAC_KEY = b"multirun golden files: test-only key, not a secret"

UTC = timezone.utc
WHEN = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


class Color(Enum):
    RED = "red"


@dataclass
class Point:
    x: int
    y: float


class Reply(BaseModel):
    text: str
    at: datetime
    raw: bytes


@dataclass
class Notes:
    """A class of the program that took a checkpoint: pickled as ``__main__.Notes``, as a
    program's own classes are when it runs as a script."""

    topic: str


Notes.__module__ = "__main__"
Notes.__qualname__ = "Notes"


def _pickled_in_main(document: Any, serializer: Any) -> bytes:
    """``dump_blob`` of ``document`` with ``Notes`` in ``__main__``, where pickle looks it up
    (it is there already when this file runs as a script)."""
    main = sys.modules["__main__"]
    earlier = main.__dict__.get("Notes")
    main.Notes = Notes  # type: ignore[attr-defined]
    try:
        return dump_blob(document, serializer)[0]
    finally:
        if earlier is None:
            del main.Notes  # type: ignore[attr-defined]
        else:
            main.Notes = earlier  # type: ignore[attr-defined]


def _v1_document() -> dict[str, Any]:
    """A checkpoint document shaped like the one multirun-otel 0.1.0's store saved."""
    return {
        "checkpoint": {
            "id": "ckpt-golden-v1",
            "run_id": "run-golden",
            "run_name": "golden",
            "agent_id": "agent-1",
            "step_id": "step-3",
            "name": "after_fetch",
            "created_at": WHEN.isoformat(),
            "environment": {"python": "3.12.1", "platform": "Linux-x86_64", "pid": 4242},
        },
        "state": {
            "text": "héllo wörld 😀",
            "nul": "a\x00b",
            "lone_surrogate": "\ud800",
            "big": 2**100,
            "negative": -7,
            "pi": 3.14159,
            "nan": float("nan"),
            "inf": float("inf"),
            "minus_inf": float("-inf"),
            "flag": True,
            "nothing": None,
            "when": WHEN,
            "amount": Decimal("12.50"),
            "tags": ("a", "b"),
            "raw": b"plain bytes",
            "color": Color.RED,
            "point": Point(1, 2.5),
            "reply": Reply(text="hi", at=WHEN, raw=b"ok"),
            "looks_tagged": {"__multirun_bytes__": "aGk="},
        },
        "replay": [["fetch", "ab" * 32, {"status": 200, "body": "ok"}]],
        "ledger": {"tokens": 1234, "cost_units": 56789, "steps": 3},
    }


def _v1_refuse(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} has no JSON form")


def _v1_blob() -> bytes:
    """Frozen copy of multirun-otel 0.1.0: ``CheckpointStore.save``'s encoding, then ``seal``."""
    payload = json.dumps(
        to_jsonable_python(_v1_document(), fallback=_v1_refuse), separators=(",", ":")
    ).encode("utf-8", "surrogatepass")
    digest = "sha256:" + hashlib.sha256(payload).hexdigest()
    header = {"version": 1, "serializer": "json", "size": len(payload), "digest": digest}
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("ascii")
    return b"MRCK1\n" + head + b"\n" + payload


def _v2_seal(payload: bytes, serializer: str, key: bytes | None = None, compression: str = "none") -> bytes:
    """Frozen copy of the version 2 ``seal``: the HMAC covers a label and the whole payload."""
    stored = zlib.compress(payload, 6) if compression == "zlib" else payload
    header: dict[str, Any] = {
        "version": 2,
        "serializer": serializer,
        "size": len(stored),
        "digest": "sha256:" + hashlib.sha256(stored).hexdigest(),
        "compression": compression,
    }
    if key:
        mac = hmac.new(key, f"MRCK/v2/{serializer}/{compression}\n".encode("ascii"), hashlib.sha256)
        mac.update(stored)
        header["hmac"] = mac.hexdigest()
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("ascii")
    return b"MRCK1\n" + head + b"\n" + stored


def v2_json_document() -> dict[str, Any]:
    """What the version 2 JSON golden files hold, as Python values before serialization."""
    return {
        "text": "héllo wörld 😀",
        "nul": "a\x00b",
        "lone_surrogate": "\ud800",
        "surrogate_pair_as_two": "\ud83d\ude00",
        "big": 2**100,
        "pi": 3.14159,
        "minus_zero": -0.0,
        "nan": float("nan"),
        "inf": float("inf"),
        "flag": False,
        "nothing": None,
        "raw": b"\x00\xff binary",
        "when": WHEN,
        "naive": datetime(2025, 1, 2, 3, 4, 5),
        "day": date(2025, 1, 2),
        "took": timedelta(seconds=1, milliseconds=500),
        "amount": Decimal("12.50"),
        "tags": ("b", "a"),
        "unique": {"b", "a", "c"},
        "color": Color.RED,
        "point": Point(1, 2.5),
        "reply": Reply(text="hi", at=WHEN, raw=b"ok"),
    }


def v2_pickle_document() -> dict[str, Any]:
    """What ``checkpoint-v2-pickle.ckpt`` holds: standard-library types only, so it loads anywhere."""
    return {
        "text": "héllo \ud800 😀",
        "big": 2**100,
        "raw": b"\x00\xff",
        "when": WHEN,
        "amount": Decimal("12.50"),
        "tags": ("b", "a"),
        "unique": frozenset({1, 2, 3}),
        "nested": [{"k": (1, 2.5, None, True)}],
    }


def v4_pickle_document() -> dict[str, Any]:
    """What ``checkpoint-v4-pickle.ckpt`` holds: a checkpoint as the store saves one, of
    standard-library types only, so it loads anywhere."""
    return {
        "checkpoint": {
            "id": "ckpt-golden-v4",
            "run_id": "run-golden",
            "run_name": "golden",
            "sub_run_id": "",
            "sub_run_seq": None,
            "agent_id": "",
            "step_id": "",
            "name": "after_fetch",
            "created_at": WHEN.isoformat(),
            "environment": {"python": "3.12.1", "platform": "Linux-x86_64", "pid": 4242},
        },
        "state": v2_pickle_document(),
        "agents": [{"name": "planner", "occurrence": 1, "state": {"plan": ("fetch", "write")}}],
        "replay": [
            {
                "name": "fetch",
                "digest": "ab" * 32,
                "occurrence": 1,
                "parent": None,
                "seq": 0,
                "end": 1,
                "lane": 0,
                "result": {"status": 200, "raw": b"\x00ok"},
            },
            {
                "name": "write",
                "digest": "cd" * 32,
                "occurrence": 1,
                "parent": None,
                "seq": 2,
                "end": None,
                "lane": 0,
            },
        ],
        "trace": {"trace_id": "0af7651916cd43dd8448eb211c80319c", "span_id": "b7ad6b7169203331"},
        "ledger": {"tokens": 1234, "cost_units": 56789, "steps": 3},
    }


def v4_json_document() -> dict[str, Any]:
    """What ``checkpoint-v4-json.ckpt`` holds: a JSON checkpoint as the store saves one."""
    document = v4_pickle_document()
    return {
        **document,
        "checkpoint": {**document["checkpoint"], "id": "ckpt-golden-v4-json"},
        "state": v2_json_document(),
        "agents": [{"name": "planner", "occurrence": 1, "state": {"plan": ["fetch", "write"]}}],
        "replay": [
            {**document["replay"][0], "result": {"status": 200}},
            document["replay"][1],
        ],
    }


# the meta section of a JSON checkpoint of format version 4: what names it, for a listing
V4_JSON_META = {
    "checkpoint": {
        "id": "ckpt-golden-v4-json",
        "run_id": "run-golden",
        "run_name": "golden",
        "name": "after_fetch",
        "created_at": WHEN.isoformat(),
    }
}


def v3_pickle_main_document() -> dict[str, Any]:
    """What ``checkpoint-v3-pickle-main.ckpt`` holds: a checkpoint as the store saved one
    before format version 4, with objects of a class of the program's ``__main__``."""
    return {
        "checkpoint": {
            "id": "ckpt-golden-v3-main",
            "run_id": "run-golden-main",
            "run_name": "researcher",
            "sub_run_id": "",
            "sub_run_seq": None,
            "agent_id": "",
            "step_id": "",
            "name": "researched",
            "created_at": WHEN.isoformat(),
            "environment": {"python": "3.12.1", "platform": "Linux-x86_64", "pid": 4242},
        },
        "state": {"notes": Notes("otel"), "count": 1},
        "agents": [{"name": "planner", "occurrence": 1, "state": {"plan": Notes("plan of otel")}}],
        "replay": [
            {
                "name": "research",
                "digest": "ef" * 32,
                "occurrence": 1,
                "parent": None,
                "seq": 0,
                "end": 1,
                "lane": 0,
                "result": Notes("otel"),
            }
        ],
        "trace": {"trace_id": "0af7651916cd43dd8448eb211c80319c", "span_id": "b7ad6b7169203331"},
        "ledger": {"tokens": 321, "cost_units": 4567, "steps": 1},
    }


def golden_files() -> dict[str, bytes]:
    """File name -> the bytes it must hold."""
    json_serializer = get_serializer("json", hmac_key=None)
    pickle_serializer = get_serializer("pickle", hmac_key=TEST_HMAC_KEY)
    signed_json_serializer = get_serializer("json", hmac_key=TEST_HMAC_KEY)
    return {
        "checkpoint-v1-json.ckpt": _v1_blob(),
        "checkpoint-v2-json.ckpt": _v2_seal(json_serializer.dumps(v2_json_document()), "json"),
        "checkpoint-v2-json-zlib.ckpt": _v2_seal(
            json_serializer.dumps(v2_json_document()), "json", compression="zlib"
        ),
        "checkpoint-v2-pickle.ckpt": _v2_seal(
            pickle_serializer.dumps(v2_pickle_document()), "pickle", TEST_HMAC_KEY
        ),
        "checkpoint-v3-json.ckpt": dump_blob(v2_json_document(), json_serializer)[0],
        "checkpoint-v3-json-zlib.ckpt": dump_blob(v2_json_document(), json_serializer, compression="zlib")[0],
        "checkpoint-v3-json-signed.ckpt": dump_blob(v2_json_document(), signed_json_serializer)[0],
        "checkpoint-v3-pickle.ckpt": dump_blob(v2_pickle_document(), pickle_serializer)[0],
        "checkpoint-v3-pickle-main.ckpt": _pickled_in_main(v3_pickle_main_document(), pickle_serializer),
        "checkpoint-v4-pickle.ckpt": dump_blob(
            v4_pickle_document(), pickle_serializer, meta=summary_of(v4_pickle_document())
        )[0],
        "checkpoint-v4-json.ckpt": dump_blob(v4_json_document(), json_serializer, meta=V4_JSON_META)[0],
    }


def main(argv: list[str]) -> int:
    os.environ.pop(HMAC_KEY_ENV, None)  # the JSON files are unsigned whatever the shell has set
    check = "--check" in argv
    changed = []
    for name, data in golden_files().items():
        path = GOLDEN_DIR / name
        if path.exists() and path.read_bytes() == data:
            continue
        changed.append(name)
        if not check:
            path.write_bytes(data)
    verb = "differ" if check else "written"
    print(f"{verb}: {', '.join(changed)}" if changed else "golden files are up to date")
    return 1 if check and changed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
