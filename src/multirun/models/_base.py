from __future__ import annotations

import random
import uuid
from datetime import datetime, timezone

from pydantic import BaseModel, ConfigDict


def new_id() -> str:
    """A random 128-bit id in hex, in the UUID4 layout.

    Drawn from ``random`` like the SDK's span ids, not from ``os.urandom``
    (``uuid.uuid4``): that system call drops and retakes the GIL so quickly
    that the span export thread starves and its queue overflows when many
    runs start (benchmarks/results/export_starvation.md). Ids need to be
    unique, not secret; ``random`` is reseeded in a forked child.
    """
    return uuid.UUID(int=random.getrandbits(128), version=4).hex


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Model(BaseModel):
    """Shared configuration: enums serialise as their values, extra fields are refused."""

    model_config = ConfigDict(use_enum_values=False, extra="forbid", validate_assignment=False)
